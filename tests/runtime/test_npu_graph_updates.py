"""FIA's host-side lengths inside captured ACL graphs, on the CPU with a recording torch_npu.

No NPU exists here and torch_npu is never installed: :class:`FakeTorchNpu` stands in for
it. It logs every graph-API call in order, implements exactly the object methods
``npu_updates.NPU_METHODS`` declares (the contract test holds those to the torch-npu
2.13.0 wheel), and its FIA computes real paged attention (the CPU reference) from the
host lengths it is given, writing into the ``out`` buffer. So a patched replay is
checked by value: after ``replay()`` the captured output holds attention over the NEW
batch's lengths. (A real ACL graph records instead of executing at capture; the fake
executes at capture and at each re-issue, which is what makes the values observable.)
"""

from __future__ import annotations

import contextlib
import random

import pytest
import torch
from torch import nn

import ascend_graph
from ascend_graph.errors import CaptureError
from ascend_graph.ops import attention as ops
from ascend_graph.ops.kernels.npu import attention as npu_attention
from ascend_graph.runtime import npu_updates
from ascend_graph.runtime.graphs import NpuGraph
from ascend_graph.runtime.pool import capture_stream
from ascend_graph.backend import ascend_backend

BLOCK, NQ, NKV, HD = 4, 6, 2, 16  # no size equal to a batch size or its +1 (Dynamo duck-sizes equal sizes)
DT = torch.float16  # FIA's own dtype: the binding's output is then the task's out buffer


# --------------------------------------------------------------------------- the fake


class _Named:
    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def __repr__(self) -> str:
        return self.name


class FakeStream(_Named):
    def wait_stream(self, other):
        self.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, event):
        self.log.append(("wait_event", self.name, event.name))


class FakeEvent(_Named):
    def record(self, stream=None):
        self.log.append(("record", self.name, stream.name))


class FakeNPUGraph(_Named):
    """``torch_npu.npu.NPUGraph``: capture_begin/capture_end on the current stream."""

    def __init__(self, log: list, name: str, npu: "FakeNpu") -> None:
        super().__init__(log, name)
        self.npu = npu

    def capture_begin(self, pool=None, capture_error_mode="global"):
        self.log.append(("capture_begin", self.name))
        self.npu.capturing = True

    def capture_end(self):
        self.npu.capturing = False
        self.log.append(("capture_end", self.name))

    def pool(self):
        return (id(self), 0)

    def replay(self):
        self.log.append(("replay", self.name))


def _fia(query, key, value, block_table, qlen, kvlen, sinks, nkv, scale, sparse_mode, pre_tokens):
    """What FIA computes in TND with a paged cache, from host lengths (CPU reference)."""
    blocks, bs, _ = key.shape
    d, dv = query.shape[2], value.shape[2] // nkv
    window = pre_tokens + 1 if sparse_mode == 4 else 0
    cu = torch.tensor([0] + list(qlen), dtype=torch.int32)
    return ops.paged_attention_reference(
        query, key.view(blocks, bs, nkv, d), value.view(blocks, bs, nkv, dv), block_table, cu, torch.tensor(list(kvlen)), sinks, scale, window
    )


class FakeFiaV2:
    """``torch_npu.npu_fused_infer_attention_score_v2``: the op packet and its ``.out``."""

    def __init__(self, owner: "FakeTorchNpu") -> None:
        self.owner = owner

    def __call__(self, query, key, value, *, actual_seq_qlen, actual_seq_kvlen, block_table, learnable_sink, num_key_value_heads, softmax_scale, sparse_mode, pre_tokens, **kw):
        assert isinstance(actual_seq_qlen, list) and isinstance(actual_seq_kvlen, list)
        self.owner.log.append(("fia", actual_seq_qlen, actual_seq_kvlen))
        out = _fia(query, key, value, block_table, actual_seq_qlen, actual_seq_kvlen, learnable_sink, num_key_value_heads, softmax_scale, sparse_mode, pre_tokens)
        return out, torch.empty(0)

    def out(self, query, key, value, *, actual_seq_qlen, actual_seq_kvlen, block_table, learnable_sink, num_key_value_heads, softmax_scale, sparse_mode, pre_tokens, workspace, out, **kw):
        assert isinstance(actual_seq_qlen, list) and isinstance(actual_seq_kvlen, list)
        npu = self.owner.npu
        self.owner.log.append(("fia.out", npu.current_stream().name, actual_seq_qlen, actual_seq_kvlen, workspace.data_ptr(), out[0].data_ptr()))
        assert npu.in_group or npu.updating is not None, "the .out call must be inside a task group or an update"
        result = _fia(query, key, value, block_table, actual_seq_qlen, actual_seq_kvlen, learnable_sink, num_key_value_heads, softmax_scale, sparse_mode, pre_tokens)
        out[0].copy_(result)
        return out[0], out[1]


class FakeNpu:
    """``torch_npu.npu``: streams, events, NPUGraph/graph, and the task-group API."""

    def __init__(self, log: list) -> None:
        self.log = log
        self._streams = [FakeStream(log, "default")]
        self._n = 0
        self.in_group = False
        self.updating = None
        self.capturing = False

    def _name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    # streams and events
    def current_stream(self, device=None):
        return self._streams[-1]

    @contextlib.contextmanager
    def stream(self, s):
        self._streams.append(s)
        try:
            yield
        finally:
            self._streams.pop()

    def Stream(self, device=None, priority=0):
        return FakeStream(self.log, self._name("stream"))

    def Event(self, enable_timing=False, blocking=False, interprocess=False):
        return FakeEvent(self.log, self._name("event"))

    # graphs
    def NPUGraph(self):
        return FakeNPUGraph(self.log, self._name("graph"), self)

    def synchronize(self, device=None):
        self.log.append(("synchronize",))

    @contextlib.contextmanager
    def graph(self, npu_graph, pool=None, stream=None, auto_dispatch_capture=False, capture_error_mode="global"):
        self.log.append(("capture_begin", npu_graph.name))
        self._streams.append(FakeStream(self.log, "capture"))
        self.capturing = True
        try:
            yield
        finally:
            self.capturing = False
            self._streams.pop()
            self.log.append(("capture_end", npu_graph.name))

    # task groups
    def graph_task_group_begin(self, stream):
        assert self.capturing and not self.in_group
        self.in_group = True
        self.log.append(("group_begin", stream.name))

    def graph_task_group_end(self, stream):
        assert self.in_group
        self.in_group = False
        handle = self._name("handle")
        self.log.append(("group_end", stream.name, handle))
        return handle

    def graph_task_update_begin(self, stream, handle):
        assert self.updating is None and not self.capturing
        self.updating = handle
        self.log.append(("update_begin", stream.name, handle))

    def graph_task_update_end(self, stream):
        assert self.updating is not None
        self.log.append(("update_end", stream.name, self.updating))
        self.updating = None


class FakeC:
    def __init__(self, log: list) -> None:
        self.log = log

    def _weak_ref_tensor(self, t):
        self.log.append(("weak_ref",))
        return t


class FakeTorchNpu:
    __version__ = "fake"

    def __init__(self) -> None:
        self.log: list = []
        self.npu = FakeNpu(self.log)
        self._C = FakeC(self.log)
        self.npu_fused_infer_attention_score_v2 = FakeFiaV2(self)
        self.workspaces: list[torch.Tensor] = []

    def _npu_fused_infer_attention_score_v2_get_max_workspace(self, query, key, value, **kw):
        assert self.npu.capturing and not self.npu.in_group
        ws = torch.empty(1024, dtype=torch.uint8)
        self.workspaces.append(ws)
        return ws

    def _npu_fused_infer_attention_score_v2_infer_output(self, query, value, *, input_layout, block_table, num_query_heads, num_key_value_heads, **kw):
        assert input_layout == "TND"
        dv = value.shape[2] // num_key_value_heads
        return query.new_empty(query.shape[0], num_query_heads, dv), torch.empty(0)

    def events(self, *kinds: str) -> list[tuple]:
        return [e for e in self.log if e[0] in kinds]


# --------------------------------------------------------------------------- a batch


def batch(q_lens, kv_lens, seed, num_blocks=32, max_blocks=5):
    g = torch.Generator().manual_seed(seed)
    r = len(q_lens)
    block_table = (torch.arange(r)[:, None] * max_blocks + torch.arange(max_blocks)).int()
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    seq_lens = torch.tensor(kv_lens, dtype=torch.int32)
    q = torch.randn(sum(q_lens), NQ, HD, generator=g).to(DT)
    return q, block_table, cu, seq_lens


@pytest.fixture(scope="module")
def caches():
    g = torch.Generator().manual_seed(7)
    return torch.randn(40, BLOCK, NKV, HD, generator=g).to(DT), torch.randn(40, BLOCK, NKV, HD, generator=g).to(DT)


def reference(q, caches, bt, cu, seq_lens, window=0):
    return ops.paged_attention_reference(q, caches[0], caches[1], bt, cu, seq_lens, None, HD**-0.5, window)


def two_layers(fake, caches, q, bt, cu, seq_lens, window=0):
    """Two attention layers reading the same metadata (as every layer of a model does)."""
    a = npu_attention._paged_call(fake, q, caches[0], caches[1], bt, cu, seq_lens, None, HD**-0.5, window)
    b = npu_attention._paged_call(fake, q, caches[0], caches[1], bt, cu, seq_lens, None, HD**-0.5, window)
    return a, b


# --------------------------------------------------------------------------- capture and replay


@pytest.mark.parametrize("window", [0, 5])
def test_capture_registers_one_task_per_call_and_replay_patches_new_lengths(caches, window):
    fake = FakeTorchNpu()
    q, bt, cu, seq_lens = batch([1, 1, 1], [9, 3, 14], 0)
    g = NpuGraph(torch.device("cpu"), torch_npu=fake)
    out_a, out_b = g.capture(lambda: two_layers(fake, caches, q, bt, cu, seq_lens, window), static_inputs=[q, bt, cu, seq_lens])

    # capture: a task group per call, on the capture stream, with the capture-time lengths
    assert [t.name for t in g.tasks] == ["paged_attention"] * 2
    groups = fake.events("group_begin", "fia.out", "group_end")
    assert [e[0] for e in groups] == ["group_begin", "fia.out", "group_end"] * 2
    assert all(e[1] == capture_stream(fake.npu, torch.device("cpu")).name for e in groups)
    assert groups[1][2:4] == ([1, 2, 3], [9, 3, 14])
    assert [t.handle for t in g.tasks] == [groups[2][2], groups[5][2]]
    assert not fake.events("fia")  # no eager (host-synchronising) call inside the capture
    # one workspace for the graph (the largest), written into by both tasks
    assert groups[1][4] == groups[4][4] == fake.workspaces[0].data_ptr()
    # every task tensor (sinks is None) held weakly after capture, and the graph's two outputs
    assert len(fake.events("weak_ref")) == 2 * 8 + 2
    torch.testing.assert_close(out_a, reference(q, caches, bt, cu, seq_lens, window))

    # the runner loads the next batch into the same static buffers (same bucket shapes)
    q2, bt2, cu2, seq2 = batch([1, 1, 1], [2, 16, 7], 1)
    q.copy_(q2), bt.copy_(bt2.flip(0)), cu.copy_(cu2), seq_lens.copy_(seq2)
    fake.log.clear()
    g.replay()

    upd = fake.log[0][1]
    assert fake.log[0] == ("wait_stream", upd, "default")  # after the previous replay, not under it
    body = fake.log[1:-3]
    assert [e[0] for e in body] == ["update_begin", "fia.out", "update_end"] * 2
    for (begin, call, end), task in zip(zip(body[::3], body[1::3], body[2::3]), g.tasks):
        assert begin == ("update_begin", upd, task.handle) and end == ("update_end", upd, task.handle)
        assert call[1] == upd and call[2:4] == ([1, 2, 3], [2, 16, 7])  # the NEW lengths
        assert call[4] == fake.workspaces[0].data_ptr() and call[5] in (out_a.data_ptr(), out_b.data_ptr())
    event = g._done.name
    assert fake.log[-3:] == [("record", event, upd), ("wait_event", "default", event), ("replay", g.graph.name)]
    # by value: the captured outputs now hold attention over the new batch
    expected = reference(q, caches, bt, cu, seq_lens, window)
    torch.testing.assert_close(out_a, expected)
    torch.testing.assert_close(out_b, expected)
    assert not torch.allclose(expected.float(), reference(q, caches, bt, cu2, torch.tensor([9, 3, 14], dtype=torch.int32), window).float())


def test_one_device_to_host_read_per_replay(caches, monkeypatch):
    fake = FakeTorchNpu()
    q, bt, cu, seq_lens = batch([2, 1], [5, 11], 2)
    g = NpuGraph(torch.device("cpu"), torch_npu=fake)
    g.capture(lambda: two_layers(fake, caches, q, bt, cu, seq_lens) + two_layers(fake, caches, q, bt, cu, seq_lens), static_inputs=[q, bt, cu, seq_lens])
    assert len(g.tasks) == 4
    reads = []
    real_cat = torch.cat
    monkeypatch.setattr(npu_updates.torch, "cat", lambda ts, *a, **k: reads.append(len(ts)) or real_cat(ts, *a, **k))
    g.replay()
    g.replay()
    assert reads == [2, 2]  # one read a replay, of the two distinct sources, for four tasks


def test_graphs_share_one_update_stream(caches):
    fake = FakeTorchNpu()
    streams = set()
    for seed in (3, 4):
        q, bt, cu, seq_lens = batch([1, 1], [4, 6], seed)
        g = NpuGraph(torch.device("cpu"), torch_npu=fake)
        g.capture(lambda: two_layers(fake, caches, q, bt, cu, seq_lens), static_inputs=[q, bt, cu, seq_lens])
        fake.log.clear()
        g.replay()
        streams.add(fake.log[0][1])
    assert len(streams) == 1


def test_graph_without_host_length_kernels_replays_without_patching():
    fake = FakeTorchNpu()
    x = torch.ones(3)
    g = NpuGraph(torch.device("cpu"), torch_npu=fake)
    g.capture(lambda: x * 2, static_inputs=[x])
    fake.log.clear()
    g.replay()
    assert fake.log == [("replay", g.graph.name)]


# --------------------------------------------------------------------------- outside the runtime's capture


def test_calls_outside_the_runtime_capture_are_the_plain_call(caches):
    fake = FakeTorchNpu()
    q, bt, cu, seq_lens = batch([1, 2], [6, 10], 5)
    out = npu_attention._paged_call(fake, q, caches[0], caches[1], bt, cu, seq_lens, None, HD**-0.5, 0)
    # a capture that is not the runtime's (the user's own torch.npu.graph) is not touched either
    with fake.npu.graph(fake.npu.NPUGraph()):
        npu_attention._paged_call(fake, q, caches[0], caches[1], bt, cu, seq_lens, None, HD**-0.5, 0)
    assert fake.events("fia") == [("fia", [1, 3], [6, 10])] * 2
    assert not fake.events("group_begin", "fia.out", "update_begin")
    assert npu_updates.active_capture() is None
    torch.testing.assert_close(out, reference(q, caches, bt, cu, seq_lens))


# --------------------------------------------------------------------------- errors


def test_length_computed_inside_the_graph_is_a_capture_error(caches):
    fake = FakeTorchNpu()
    q, bt, cu, seq_lens = batch([1, 1], [4, 6], 6)
    g = NpuGraph(torch.device("cpu"), torch_npu=fake)
    with pytest.raises(CaptureError) as e:
        g.capture(lambda: two_layers(fake, caches, q, bt, cu, seq_lens + 0), static_inputs=[q, bt, cu, seq_lens])
    assert "not one of the runner's static input buffers" in str(e.value)
    assert "seq_lens" in e.value.expected and "computed inside the graph" in e.value.got
    assert not fake.events("group_begin")


class OldFakeNpu(FakeNpu):
    """A torch_npu.npu without ``graph_task_update_begin`` (hasattr is False)."""

    @property
    def graph_task_update_begin(self):
        raise AttributeError("graph_task_update_begin")


def test_torch_npu_without_task_groups_is_a_capture_error(caches):
    fake = FakeTorchNpu()
    fake.npu = OldFakeNpu(fake.log)
    q, bt, cu, seq_lens = batch([1, 1], [4, 6], 6)
    g = NpuGraph(torch.device("cpu"), torch_npu=fake)
    with pytest.raises(CaptureError) as e:
        g.capture(lambda: two_layers(fake, caches, q, bt, cu, seq_lens), static_inputs=[q, bt, cu, seq_lens])
    assert "torch_npu.npu.graph_task_update_begin" in e.value.expected
    assert "missing ['torch_npu.npu.graph_task_update_begin']" in e.value.got
    assert not fake.events("group_begin")


# --------------------------------------------------------------------------- through the runner


class PagedAttentionOnly(nn.Module):
    """Paged attention over FIA metadata inputs, its output returned as is (so the fake
    graph's re-issued FIA call is the whole replay)."""

    def __init__(self, caches):
        super().__init__()
        self.register_buffer("k_cache", caches[0].clone())
        self.register_buffer("v_cache", caches[1].clone())

    def forward(self, q, block_table, query_start_loc, seq_lens):
        torch._check(q.shape[0] == seq_lens.shape[0])  # uniform decode: one token a request
        torch._check(block_table.shape[0] == seq_lens.shape[0])
        torch._check(query_start_loc.shape[0] == seq_lens.shape[0] + 1)
        return torch.ops.ascend_graph.paged_attention(q, self.k_cache, self.v_cache, block_table, query_start_loc, seq_lens, None, HD**-0.5, 0)


@contextlib.contextmanager
def npu_binding_on_cpu(fake):
    """Route ``ascend_graph::paged_attention`` on CPU tensors through the NPU binding with
    ``fake`` as torch_npu; the CPU reference is put back afterwards."""
    ops.paged_attention.register_kernel("cpu", lambda *a: npu_attention._paged_call(fake, *a))
    try:
        yield
    finally:
        ops.paged_attention.register_kernel("cpu", ops.paged_attention_reference)


def test_runner_replays_patch_each_batch_lengths(caches, monkeypatch):
    """The bucketed runner with NPU graphs: captures put the attention call in a task group,
    and every later batch of the bucket (new kv lengths, new padded metadata in the static
    buffers) is served by a replay whose patched FIA call reads that batch's lengths."""
    from ascend_graph.runtime import runner as R

    fake = FakeTorchNpu()
    monkeypatch.setattr(R, "supports_graphs", lambda device: True)
    monkeypatch.setattr(R, "new_graph", lambda device, enabled=True: NpuGraph(device, torch_npu=fake))
    model = PagedAttentionOnly(caches).eval()
    torch._dynamo.reset()
    # without the attention family there is no in-graph FIA padding (passes/padding.py):
    # the metadata reach the op as the runner's static buffers (see the next test)
    cm = torch.compile(model, backend=ascend_backend, options={"codegen": "fx", "buckets": [4, 8], "fusions": ()}, dynamic=True)
    rng = random.Random(0)
    with npu_binding_on_cpu(fake), torch.no_grad():
        for trial, r in enumerate([3, 3, 2, 5, 4, 7]):
            kv = [rng.randint(1, 16) for _ in range(r)]
            q, bt, cu, seq_lens = batch([1] * r, kv, 10 + trial)
            out = cm(q, bt, cu, seq_lens)
            torch.testing.assert_close(out, reference(q, caches, bt, cu, seq_lens))
            if trial == 1:  # the second call of bucket 4: a replay, patched with this batch
                updates = fake.events("update_begin", "fia.out")
                assert updates[-1][2:4] == (list(range(1, 5)), kv + [1])  # padded: one dummy request, kv length 1
    st = ascend_graph.stats()
    assert st["capture_failures"] == 0 and st["eager_fallbacks"] == 0
    assert len(fake.events("group_begin")) == 2  # buckets 4 and 8: one attention call each
    assert len(fake.events("update_begin")) == 4  # every call after a bucket's capture is a patched replay
    assert len(fake.events("replay")) == 4


def test_attention_family_on_npu_captures_and_patches_the_graph_inputs(caches, monkeypatch):
    """With the attention family on (the default), on an NPU the padding pass leaves
    paged attention's metadata as the graph's inputs (passes/padding._patched_at_replay,
    stood in for here: CPU torch has no npu device), so every bucket captures, and each
    replay is patched with that batch's lengths and matches the reference."""
    from ascend_graph.passes import padding as padding_pass
    from ascend_graph.runtime import runner as R

    fake = FakeTorchNpu()
    asked = []
    monkeypatch.setattr(padding_pass, "_patched_at_replay", lambda cu, lens: asked.append((cu.op, lens.op)) or True)
    monkeypatch.setattr(R, "supports_graphs", lambda device: True)
    monkeypatch.setattr(R, "new_graph", lambda device, enabled=True: NpuGraph(device, torch_npu=fake))
    model = PagedAttentionOnly(caches).eval()
    torch._dynamo.reset()
    cm = torch.compile(model, backend=ascend_backend, options={"codegen": "fx", "buckets": [4, 8]}, dynamic=True)
    rng = random.Random(1)
    with npu_binding_on_cpu(fake), torch.no_grad():
        for trial, r in enumerate([3, 2, 4, 6]):
            kv = [rng.randint(1, 16) for _ in range(r)]
            q, bt, cu, seq_lens = batch([1] * r, kv, 30 + trial)
            torch.testing.assert_close(cm(q, bt, cu, seq_lens), reference(q, caches, bt, cu, seq_lens))
            if trial == 1:  # bucket 4 again: a replay patched with this batch (two dummies)
                assert fake.events("update_begin", "fia.out")[-1][2:4] == ([1, 2, 3, 4], kv + [1, 1])
    st = ascend_graph.stats()
    assert asked and all(a == ("placeholder", "placeholder") for a in asked)
    assert st["padding"]["rewrites"] == 0
    assert st["capture_failures"] == 0 and st["eager_fallbacks"] == 0
    assert len(fake.events("group_begin")) == 2 and len(fake.events("update_begin")) == 2


def test_vllm_padded_metadata_at_an_exact_bucket_is_patched_by_the_fia_rule(caches):
    """vLLM pads the way FIA rejects: query_start_loc's tail repeats its last value and
    seq_lens is 0, at a batch exactly the bucket's size. The lengths patched in (and
    those of the capture) go through the planner's rule on the host: T == cu[-1], at
    most 16 tokens and a KV length >= 1 per dummy request; the real rows are right."""
    fake = FakeTorchNpu()
    T = 6
    q, bt, _, _ = batch([1] * T, [1] * T, 40)
    cu = torch.tensor([0, 1, 2, 3, 3, 3, 3], dtype=torch.int32)  # 3 real requests, 3 padded slots
    seq_lens = torch.tensor([5, 9, 2, 0, 0, 0], dtype=torch.int32)
    g = NpuGraph(torch.device("cpu"), torch_npu=fake)
    (out, _) = g.capture(lambda: two_layers(fake, caches, q, bt, cu, seq_lens), static_inputs=[q, bt, cu, seq_lens])
    assert fake.events("fia.out")[0][2:4] == ([1, 2, 3, 4, 5, 6], [5, 9, 2, 1, 1, 1])

    # the next vLLM batch: 1 request of 2 tokens (an MTP-like row) + 1 of 1, then 3 empty
    cu.copy_(torch.tensor([0, 2, 3, 3, 3, 3, 3], dtype=torch.int32))
    seq_lens.copy_(torch.tensor([12, 7, 0, 0, 0, 0], dtype=torch.int32))
    q.copy_(batch([1] * T, [1] * T, 41)[0])
    fake.log.clear()
    g.replay()
    calls = fake.events("fia.out")
    assert len(calls) == 2
    for call in calls:
        qlen, kvlen = call[2], call[3]
        assert qlen[-1] == T  # FIA's T == cu[-1] (error 561002 otherwise)
        sizes = [b - a for a, b in zip([0] + qlen, qlen)]
        assert max(sizes) <= 16 and min(kvlen) >= 1
        assert (qlen, kvlen) == ([2, 3, 4, 5, 6, 6], [12, 7, 1, 1, 1, 1])  # 3 padded tokens over 4 empty requests
    real = reference(q[:3], caches, bt[:2], cu[:3], seq_lens[:2])
    torch.testing.assert_close(out[:3], real)


def test_patched_lengths_the_rule_cannot_repair_are_a_padding_error(caches):
    """More padded tokens than the empty requests may hold (16 each): a PaddingError with
    expected/got before anything is patched, not FIA's error 561002 on the device."""
    from ascend_graph.errors import PaddingError

    fake = FakeTorchNpu()
    T = 20
    q, _, _, _ = batch([1] * T, [1] * T, 42)
    bt = (torch.arange(2)[:, None] * 5 + torch.arange(5)).int()
    cu = torch.tensor([0, 2, 20], dtype=torch.int32)
    seq_lens = torch.tensor([4, 18], dtype=torch.int32)
    g = NpuGraph(torch.device("cpu"), torch_npu=fake)
    g.capture(lambda: two_layers(fake, caches, q, bt, cu, seq_lens), static_inputs=[q, bt, cu, seq_lens])
    cu.copy_(torch.tensor([0, 2, 2], dtype=torch.int32))  # 18 padded tokens, one empty request
    fake.log.clear()
    with pytest.raises(PaddingError, match="more than 16"):
        g.replay()
    assert not fake.events("update_begin", "replay")


class NoOutFia(FakeFiaV2):
    """An FIA op packet without the ``.out`` overload."""

    @property
    def out(self):
        raise AttributeError("out")


def test_runner_drops_a_bucket_whose_lengths_cannot_be_patched(caches, monkeypatch):
    """A torch_npu without the task-group API: the capture raises CaptureError, the runner
    counts the failure and serves the bucket without a graph (outputs still right)."""
    from ascend_graph.runtime import runner as R

    fake = FakeTorchNpu()
    fake.npu_fused_infer_attention_score_v2 = NoOutFia(fake)
    monkeypatch.setattr(R, "supports_graphs", lambda device: True)
    monkeypatch.setattr(R, "new_graph", lambda device, enabled=True: NpuGraph(device, torch_npu=fake))
    model = PagedAttentionOnly(caches).eval()
    torch._dynamo.reset()
    cm = torch.compile(model, backend=ascend_backend, options={"codegen": "fx", "buckets": [4], "fusions": ()}, dynamic=True)
    with npu_binding_on_cpu(fake), torch.no_grad():
        for seed in (20, 21):
            q, bt, cu, seq_lens = batch([1, 1, 1], [3, 8, 5], seed)
            torch.testing.assert_close(cm(q, bt, cu, seq_lens), reference(q, caches, bt, cu, seq_lens))
    st = ascend_graph.stats()
    failures = [v["failed"] for v in st["buckets"].values() if "failed" in v]
    assert st["capture_failures"] == len(failures) >= 1
    assert all(f.startswith("CaptureError: torch_npu lacks ['torch_npu.npu_fused_infer_attention_score_v2.out']") for f in failures)
    assert not fake.events("replay", "update_begin")
