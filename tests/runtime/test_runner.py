"""The bucketed runner on the CPU (no device graph: same padding, buckets and counters)."""

import random

import pytest
import torch
from torch import nn

import ascend_graph
from ascend_graph.backend import ascend_backend
from ascend_graph.runtime.buckets import plan_buckets
import ascend_graph.ops.attention  # noqa: F401,E402  (registers the paged ops)


class Toy(nn.Module):
    """A token-major layer plus a vLLM-style cache write (slot < 0 goes to a trash row)."""

    def __init__(self, n_slots: int = 64):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.n_slots = n_slots

    def forward(self, x, slot_mapping, cache):
        y = torch.relu(self.lin(x)) * 2
        # padded rows carry slot -1: redirect them to the trash row past the real slots
        idx = torch.where(slot_mapping < 0, torch.full_like(slot_mapping, self.n_slots), slot_mapping)
        cache.index_copy_(0, idx, y)
        return y.sum(-1), y


def bucket_of(key: str) -> int:
    """Stats keys are 'graph:bucket' or 'graph:bucketxother...'."""
    return int(key.split(":")[1].split("x")[0])


def compiled_toy(**options):
    torch._dynamo.reset()
    model = Toy()
    opts = {"codegen": "fx", "buckets": [1, 2, 4, 8, 16]}
    opts.update(options)
    return model, torch.compile(model, backend=ascend_backend, options=opts, dynamic=True)


def inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    slots = torch.randperm(64, generator=g)[:n]
    return x, slots


def test_padded_then_sliced_equals_unpadded_for_random_batches():
    model, cm = compiled_toy()
    rng = random.Random(0)
    for trial in range(12):
        n = rng.randint(1, 16)
        x, slots = inputs(n, trial)
        cache_a, cache_b = torch.zeros(65, 8), torch.zeros(65, 8)
        with torch.no_grad():
            ref = model(x, slots, cache_a)
            out = cm(x, slots, cache_b)
        assert out[0].shape == (n,) and out[1].shape == (n, 8)
        torch.testing.assert_close(out[0], ref[0])
        torch.testing.assert_close(out[1], ref[1])
        torch.testing.assert_close(cache_b[:64], cache_a[:64])
    st = ascend_graph.stats()
    assert st["replays"] == 12 and st["eager_fallbacks"] == 0
    assert st["padding"]["real_rows"] + st["padding"]["padded_rows"] > st["padding"]["real_rows"]


def test_padded_rows_never_write_the_cache():
    _, cm = compiled_toy()
    x, slots = inputs(5)  # bucket 8: three padded rows with slot -1
    cache = torch.full((65, 8), 7.0)
    with torch.no_grad():
        cm(x, slots, cache)
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    assert (cache[:64][untouched] == 7.0).all()
    assert ascend_graph.stats()["padding"]["padded_rows"] == 3


def test_above_largest_bucket_runs_without_graph_and_is_counted():
    model, cm = compiled_toy()
    x, slots = inputs(20)
    cache = torch.zeros(65, 8)
    with torch.no_grad():
        out = cm(x, slots, cache)
        ref = model(x, slots, torch.zeros(65, 8))
    torch.testing.assert_close(out[1], ref[1])
    st = ascend_graph.stats()
    assert st["eager_fallbacks"] == 1 and st["fallback_reasons"] == {"above_largest_bucket": 1}


def test_serving_continues_after_a_failed_capture(monkeypatch, caplog):
    from ascend_graph.runtime import graphs

    real = graphs.NoGraph.capture
    calls = {"n": 0}

    def flaky(self, fn, pool=None, static_inputs=(), stream=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("simulated: no memory for this bucket")
        return real(self, fn, pool)

    monkeypatch.setattr(graphs.NoGraph, "capture", flaky)
    model, cm = compiled_toy()
    with torch.no_grad():
        for n in (3, 3):  # bucket 4 fails: the call runs as called; the next goes to bucket 8
            x, slots = inputs(n)
            out = cm(x, slots, torch.zeros(65, 8))
            ref = model(x, slots, torch.zeros(65, 8))
            torch.testing.assert_close(out[1], ref[1])
    st = ascend_graph.stats()
    assert st["capture_failures"] == 1 and st["fallback_reasons"] == {"capture_failed": 1}
    ok = [bucket_of(k) for k, v in st["buckets"].items() if "failed" not in v]
    failed = [bucket_of(k) for k, v in st["buckets"].items() if "failed" in v]
    assert ok == [8] and failed == [4]
    assert "capture of" in caplog.text and "failed" in caplog.text


def test_graph_cap_bounds_captures():
    model, cm = compiled_toy(max_graphs=2)
    with torch.no_grad():
        # from 2: Dynamo specialises a size-1 batch into a static graph of its own
        for n in (2, 3, 5, 9, 6):
            x, slots = inputs(n)
            cm(x, slots, torch.zeros(65, 8))
    st = ascend_graph.stats()
    assert st["buckets_captured"] == 2
    assert st["fallback_reasons"] == {"graph_limit": 3}


def test_warmup_captures_every_bucket_largest_first():
    model, cm = compiled_toy()
    x, slots = inputs(5)
    with torch.no_grad():
        ascend_graph.warmup(cm, x, slots, torch.zeros(65, 8))
    keys = list(ascend_graph.stats()["buckets"])
    # the call runs at its bucket without a graph (initialising the device), then every
    # bucket is captured largest first, its own included
    assert [bucket_of(k) for k in keys] == [16, 8, 4, 2, 1]


class SeqModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):  # [B, S, 6]: S is a second symbol
        return self.lin(x).softmax(dim=1)


def test_other_symbols_key_their_own_graphs():
    torch._dynamo.reset()
    model = SeqModel()
    cm = torch.compile(model, backend=ascend_backend, options={"codegen": "fx", "buckets": [2, 4]}, dynamic=True)
    with torch.no_grad():
        for b, s in [(2, 3), (3, 3), (3, 5), (2, 5)]:
            x = torch.randn(b, s, 6)
            torch.testing.assert_close(cm(x), model(x))
    keys = sorted(k.split(":")[1] for k in ascend_graph.stats()["buckets"])
    assert keys == ["2x3", "2x5", "4x3", "4x5"]


def test_unknown_option_names_it_and_lists_valid_ones():
    torch._dynamo.reset()
    cm = torch.compile(SeqModel(), backend=ascend_backend, options={"bucketz": [1]})
    with pytest.raises(Exception) as e:
        cm(torch.randn(2, 3, 6))
    inner = e.value.__cause__ or getattr(e.value, "inner_exception", None)
    assert isinstance(inner, ascend_graph.ConfigError)
    assert "bucketz" in str(inner) and "buckets" in str(inner)


class Recurrent(nn.Module):
    """A non-idempotent in-place state update (like a gated-delta recurrent state)."""

    def forward(self, x, state):
        state.mul_(0.5).add_(x.sum(0))
        return x * state.sum()


def test_state_updates_run_exactly_once_per_call_and_never_at_warmup():
    torch._dynamo.reset()
    model = Recurrent()
    cm = torch.compile(model, backend=ascend_backend, options={"codegen": "fx", "buckets": [2, 4, 8]}, dynamic=True)
    s_ref, s_out = torch.ones(3), torch.ones(3)
    with torch.no_grad():
        for step, n in enumerate([3, 5, 3, 2, 7]):
            x = torch.randn(n, 3)
            ref = model(x, s_ref)
            out = ascend_graph.warmup(cm, x, s_out) if step == 1 else cm(x, s_out)
            torch.testing.assert_close(out, ref)
            torch.testing.assert_close(s_out, s_ref)


class Transposed(nn.Module):
    def forward(self, k):  # k arrives transposed, as HF's value caches do
        return k.transpose(1, 2).reshape(k.shape[0], -1) * 2


def test_inputs_keep_the_layout_they_were_traced_with():
    torch._dynamo.reset()
    model = Transposed()
    cm = torch.compile(model, backend=ascend_backend, options={"codegen": "fx", "buckets": [4, 8]}, dynamic=True)
    with torch.no_grad():
        for n in (3, 6, 2):
            k = torch.randn(n, 5, 4).transpose(1, 2)
            torch.testing.assert_close(cm(k), model(k))


def test_broadcast_inputs_keep_their_stride_zero_layout():
    torch._dynamo.reset()

    def f(x, mask):
        return x.masked_fill(mask, 0.0)

    cf = torch.compile(f, backend=ascend_backend, options={"codegen": "fx", "buckets": [4, 8]}, dynamic=True)
    for n in (3, 5):
        x = torch.randn(n, 6)
        mask = (torch.arange(6) % 2 == 0).expand(n, 6)  # stride 0 along the batch
        torch.testing.assert_close(cf(x, mask), f(x, mask))


def test_memory_budget_drops_captures_that_do_not_fit(monkeypatch):
    """Each capture 'grows the pool' by 600 bytes; the budget holds one."""
    from ascend_graph.runtime import graphs
    from ascend_graph.runtime import runner as R

    monkeypatch.setattr(R, "supports_graphs", lambda device: True)
    monkeypatch.setattr(R, "new_graph", lambda device, enabled=True: graphs.NoGraph())
    reserved = {"n": 0}

    def fake_reserved(device):
        reserved["n"] += 600  # read before and after each capture: +600 a capture
        return reserved["n"]

    monkeypatch.setattr(R, "pool_reserved_bytes", fake_reserved)
    model, cm = compiled_toy(memory_budget_bytes=1000)
    with torch.no_grad():
        for n in (3, 5, 6, 7):  # bucket 4 fits; 8 and then 16 would not; then nothing is left above 4
            x, slots = inputs(n)
            torch.testing.assert_close(cm(x, slots, torch.zeros(65, 8))[1], model(x, slots, torch.zeros(65, 8))[1])
    st = ascend_graph.stats()
    kept = [bucket_of(k) for k, v in st["buckets"].items() if "failed" not in v]
    dropped = sorted(bucket_of(k) for k, v in st["buckets"].items() if "failed" in v)
    assert kept == [4] and dropped == [8, 16]
    assert all("memory budget" in v["failed"] for v in st["buckets"].values() if "failed" in v)
    assert st["fallback_reasons"] == {"above_largest_bucket": 1}


# --------------------------------------------------------------------------- FIA padding through the runner

BLOCK, NQ, NKV, HD, HID = 4, 4, 2, 16, 32


class PagedLayer(nn.Module):
    """One attention layer as a serving engine runs it: tokens flattened to [T], a paged KV
    cache written in place (slot -1 skipped), paged attention in TND over FIA metadata."""

    def __init__(self, q_per_request: int | None, num_blocks: int = 64):
        super().__init__()
        self.q = q_per_request
        self.qkv = nn.Linear(HID, (NQ + 2 * NKV) * HD)
        self.o = nn.Linear(NQ * HD, HID)
        self.register_buffer("k_cache", torch.randn(num_blocks, BLOCK, NKV, HD))
        self.register_buffer("v_cache", torch.randn(num_blocks, BLOCK, NKV, HD))

    def forward(self, x, slot_mapping, block_table, query_start_loc, seq_lens):
        t = x.shape[0]
        if self.q is not None:  # uniform: exactly q tokens a request, said to Dynamo
            torch._check(t == seq_lens.shape[0] * self.q)
        torch._check(slot_mapping.shape[0] == t)
        torch._check(block_table.shape[0] == seq_lens.shape[0])
        torch._check(query_start_loc.shape[0] == seq_lens.shape[0] + 1)
        q, k, v = self.qkv(x).split([NQ * HD, NKV * HD, NKV * HD], dim=-1)
        k, v = k.reshape(t, NKV, HD), v.reshape(t, NKV, HD)
        torch.ops.ascend_graph.reshape_and_cache(k, v, self.k_cache, self.v_cache, slot_mapping)
        a = torch.ops.ascend_graph.paged_attention(q.reshape(t, NQ, HD), self.k_cache, self.v_cache, block_table, query_start_loc, seq_lens, None, HD**-0.5, 0)
        return self.o(a.reshape(t, NQ * HD))


def paged_batch(q_lens, ctx, seed, max_blocks=6):
    """Request r owns blocks [r*max_blocks, ...); its q_lens[r] new tokens follow ctx[r] cached ones."""
    g = torch.Generator().manual_seed(seed)
    r = len(q_lens)
    block_table = (torch.arange(r)[:, None] * max_blocks + torch.arange(max_blocks)).int()
    seq_lens = torch.tensor([c + n for c, n in zip(ctx, q_lens)], dtype=torch.int32)
    slots = []
    for i, (c, n) in enumerate(zip(ctx, q_lens)):
        slots += [int(block_table[i, p // BLOCK]) * BLOCK + p % BLOCK for p in range(c, c + n)]
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    x = torch.randn(sum(q_lens), HID, generator=g)
    return x, torch.tensor(slots), block_table, cu, seq_lens


def compile_with_runners(model, **options):
    runners = []

    def backend(gm, example_inputs):
        r = ascend_backend(gm, example_inputs, options=options)
        runners.append(r)
        return r

    torch._dynamo.reset()
    return torch.compile(model, backend=backend, dynamic=True), runners


@pytest.mark.parametrize("k", [0, 2])
def test_padded_paged_batch_real_rows_equal_the_unpadded_run(k):
    """Uniform decode (k=0) and an MTP verify batch (k=2) through paged attention on the CPU:
    the padded batch keeps FIA's rules in the static buffers, and the real rows (and the
    cache) equal the unpadded eager run."""
    torch.manual_seed(0)
    q = 1 + k
    model = PagedLayer(q).eval()
    cm, runners = compile_with_runners(model, codegen="fx", buckets=[2, 4, 8, 16], num_speculative_tokens=k)
    rng = random.Random(k)
    for trial, r in enumerate([3, 2, 5, 3]):
        ctx = [rng.randint(0, 12) for _ in range(r)]
        batch = paged_batch([q] * r, ctx, trial)
        caches = (model.k_cache.clone(), model.v_cache.clone())
        with torch.no_grad():
            out = cm(*batch)
            after = (model.k_cache.clone(), model.v_cache.clone())
            model.k_cache.copy_(caches[0]), model.v_cache.copy_(caches[1])
            ref = model(*batch)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(after[0], model.k_cache)
        torch.testing.assert_close(after[1], model.v_cache)
    runner = next(r for r in runners if r.plan is not None)
    # token buckets (multiples of 1+k) served as request buckets: 2, 4, 8, 16 tokens
    assert runner.plan.sizes == tuple(b // q for b in plan_buckets([2, 4, 8, 16], num_speculative_tokens=k).sizes)
    assert len(runner.fia) == 1 and runner.fia[0].uniform_query_len == q
    names = [v.name for v in runner.shapes.inputs]
    i_cu, i_lens, i_bt, i_slot = (names.index(n) for n in ("query_start_loc", "seq_lens", "block_table", "slot_mapping"))
    real_reqs = 3
    entry = next(e for key, e in runner.entries.items() if key[0] == runner.plan.select(real_reqs))  # the last call
    pad_reqs = entry.bucket
    cu = entry.static_args[i_cu].tolist()
    assert len(cu) == pad_reqs + 1 and cu[-1] == pad_reqs * q == entry.static_args[names.index("x")].shape[0]  # T_pad == cu_q[-1]
    assert [b - a for a, b in zip(cu, cu[1:])] == [q] * pad_reqs  # still uniform, dummies included
    assert entry.static_args[i_lens][real_reqs:].tolist() == [1] * (pad_reqs - real_reqs)
    assert not entry.static_args[i_bt][real_reqs:].any()
    assert (entry.static_args[i_slot][real_reqs * q :] == -1).all()
    st = ascend_graph.stats()
    assert st["eager_fallbacks"] == 0 and st["padding"]["padded_rows"] > 0


def test_mixed_batch_with_no_request_to_absorb_padding_is_a_padding_error():
    """Tokens pad with the bucket but the request count is its own symbol: FIA would get
    T_pad != cu_q[-1] (error 561002), so the plan is refused before the bucket runs."""
    torch.manual_seed(0)
    model = PagedLayer(None).eval()
    cm, _ = compile_with_runners(model, codegen="fx", buckets=[4, 8, 16])
    with torch.no_grad():
        cm(*paged_batch([3, 1, 4], [2, 5, 0], 0))  # 8 tokens: the bucket exactly, nothing padded
        with pytest.raises(ascend_graph.PaddingError) as e:
            cm(*paged_batch([2, 1, 3], [2, 5, 0], 1))  # 6 tokens in bucket 8
    assert "no dummy request" in str(e.value) and e.value.got == "3 request slots for 3 requests"


def test_capture_guard_collects_the_young_generations_only(monkeypatch):
    # a full collection of a compiled model's heap cost 0.47 s a lazily captured bucket on
    # the H100 machine; the garbage a capture wants back is the last calls', in the young
    # generations (the warm-up loop runs its one full collection itself)
    import gc

    from ascend_graph.runtime.graphs import capture_guard

    calls = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(generation) or 0)
    with capture_guard(torch.device("cpu")):
        assert not gc.isenabled()
    with capture_guard(torch.device("cpu"), collect=False):
        pass
    assert calls == [1] and gc.isenabled()
