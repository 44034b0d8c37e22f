"""Quick start: a tiny random-weight HF Qwen3 compiled with backend="ascend".

Runs on the CPU (and on CUDA if one is present). It compiles the model once for prefill
and once for decode (two Dynamo graphs: the batch and the KV length are marked dynamic
up front, so no batch size or cache length triggers a recompile), serves prefill and
decode steps at batch 2 and 3 (batch 3 runs padded in bucket 4), checks every logit
against eager, times one decode step eager vs compiled, and prints what happened.

    python examples/quickstart.py
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

BUCKETS = [1, 2, 4, 8]


def _mark_batch_dynamic(ids: torch.Tensor, cache: DynamicCache | None) -> None:
    """Tell Dynamo up front which dims vary: the batch everywhere, the KV length of the
    cache. Without this it compiles a static graph first and recompiles on each new
    shape (the batch, then every cache length): 6 graphs for this script instead of 2."""
    torch._dynamo.mark_dynamic(ids, 0)
    for layer in cache.layers if cache is not None else ():
        for t in (layer.keys, layer.values):
            torch._dynamo.mark_dynamic(t, 0)
            torch._dynamo.mark_dynamic(t, 2)


def _contiguous(cache: DynamicCache) -> DynamicCache:
    """The prefill leaves each layer's keys in the k-projection's layout ([B, S, H, D]
    memory, a transposed view); every decode step after it leaves a contiguous
    ``torch.cat``. Dynamo guards strides, so the first decode step would get a graph of
    its own: one copy here keeps decode at one graph."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()
    return cache


def _step(model, ids, cache=None, mark=False):
    if mark:
        _mark_batch_dynamic(ids, cache)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    return out.logits, out.past_key_values


def _decode_latency_ms(model, ids, cache, device, warmup, iters) -> float:
    """Median time of one decode step from the same cache state (same shapes every call:
    on CUDA one captured graph replayed, not a new capture per cache length)."""
    snapshot = [(layer.keys, layer.values) for layer in cache.layers]
    times = []
    for i in range(warmup + iters):
        # DynamicLayer.update assigns a new (longer) tensor; putting the old ones back
        # rewinds the cache without a copy
        for layer, (k, v) in zip(cache.layers, snapshot):
            layer.keys, layer.values = k, v
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _step(model, ids, cache)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    for layer, (k, v) in zip(cache.layers, snapshot):
        layer.keys, layer.values = k, v
    return statistics.median(times) * 1e3


def run(batches=(2, 3), prompt_len=12, decode_steps=3, warmup=5, iters=50, device=None) -> dict:
    """Compile, serve, compare with eager and time; returns what ``main`` prints."""
    import ascend_graph  # only for stats(): the backend itself is found by name

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    )
    model = Qwen3ForCausalLM(config).to(device).eval()
    # No import of ascend_graph is needed for this: the backend is found through its entry point.
    compiled = torch.compile(model, backend="ascend", options={"buckets": BUCKETS})
    ascend_graph.reset_stats()

    worst = 0.0
    calls = []
    start = time.perf_counter()
    for batch in batches:
        ids = torch.randint(0, config.vocab_size, (batch, prompt_len), device=device)
        ref, ref_cache = _step(model, ids)
        out, out_cache = _step(compiled, ids, mark=True)
        out_cache = _contiguous(out_cache)
        calls.append(("prefill", batch))
        worst = max(worst, (ref - out).abs().max().item())
        nxt = ref[:, -1:].argmax(-1)
        for _ in range(decode_steps):
            ref, ref_cache = _step(model, nxt, ref_cache)
            out, out_cache = _step(compiled, nxt, out_cache, mark=True)
            calls.append(("decode", batch))
            worst = max(worst, (ref - out).abs().max().item())
            nxt = ref[:, -1:].argmax(-1)
    compile_and_first_runs = time.perf_counter() - start
    served = ascend_graph.stats()

    # Steady state: one decode step at the last (padded) batch, eager vs compiled, each
    # from its own copy of the same cache.
    eager_ms = _decode_latency_ms(model, nxt, ref_cache, device, warmup, iters)
    compiled_ms = _decode_latency_ms(compiled, nxt, out_cache, device, warmup, iters)
    return {
        "device": device,
        "layers": config.num_hidden_layers,
        "batches": list(batches),
        "prompt_len": prompt_len,
        "calls": calls,
        "context": ref_cache.get_seq_length(),
        "compile_and_first_runs_s": compile_and_first_runs,
        "worst_logit_diff": worst,
        "eager_ms": eager_ms,
        "compiled_ms": compiled_ms,
        "warmup": warmup,
        "iters": iters,
        "stats": served,
    }


def _bucket(batch: int) -> int:
    return next(b for b in BUCKETS if b >= batch)


def report(r: dict) -> str:
    st, pad = r["stats"], r["stats"]["padding"]
    fused = {family: n for family, n in st["fusions"].items() if n}
    last = r["batches"][-1]
    steps = len(r["calls"]) // len(r["batches"]) - 1
    if r["device"] == "cuda":
        how = "each a CUDA graph replay, one graph captured per bucket and cache length"
    else:
        how = "no device graphs on the CPU: the runner pads to the bucket and runs inductor's code"
    ratio = r["eager_ms"] / r["compiled_ms"]
    lines = [
        f"ascend-graph quick start: tiny random-weight Qwen3 ({r['layers']} layers) on {r['device']}",
        "",
        f"compiled   {st['graphs_compiled']} Dynamo graphs, prefill and decode (batch and KV length dynamic),"
        f" {st['compile_seconds']:.1f} s of compile",
        "           fused: " + (", ".join(f"{k} x{v}" for k, v in fused.items()) or "nothing")
        + " (rewrites over both graphs; the other fusion passes found no match in a dense Qwen3)",
        f"served     {len(r['calls'])} calls: at batch {' and '.join(map(str, r['batches']))}, a {r['prompt_len']}-token"
        f" prefill then {steps} decode steps; compile + these calls took {r['compile_and_first_runs_s']:.1f} s",
        f"padded     to buckets {BUCKETS}: "
        + (", ".join(f"batch {b} ran as {_bucket(b)}" for b in r["batches"] if _bucket(b) != b) or "no batch needed it")
        + f" ({pad['padded_rows']} dummy rows beside {pad['real_rows']} real ones)",
        f"replayed   {st['replays']} calls ({how}); eager fallbacks: {st['eager_fallbacks']}",
        f"checked    max |logit difference| from eager over every call: {r['worst_logit_diff']:.1e}",
        "",
        f"latency    one decode step, batch {last} (runs as {_bucket(last)}), {r['context']} tokens of context,"
        f" median of {r['iters']} after {r['warmup']} warm-up:",
        f"           eager {r['eager_ms']:.2f} ms, ascend {r['compiled_ms']:.2f} ms: "
        + (f"{ratio:.2f}x as fast" if ratio >= 1 else f"{1 / ratio:.2f}x as slow"),
    ]
    if r["device"] == "cpu":
        lines += [
            "           On the CPU there is no device graph: the difference is inductor's generated C++",
            "           (fused loops, no per-op dispatch) against eager's op-by-op run, less the padded",
            "           row. Device graphs and the fused kernels are the GPU/NPU win; the CPU path is there",
            "           so the same compile, padding and bucketing run (and are tested) anywhere.",
        ]
    else:
        lines += [
            "           A small model's decode step is bound by kernel launches on a GPU: the compiled",
            "           step is one captured CUDA graph replayed, inputs copied into its static buffers.",
        ]
    return "\n".join(lines)


def main() -> None:
    r = run()
    print(report(r))
    assert r["worst_logit_diff"] < 1e-3, f"compiled output differs from eager by {r['worst_logit_diff']}"


if __name__ == "__main__":
    main()
