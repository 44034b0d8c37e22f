"""Quick start: a tiny random-weight HF Qwen3 compiled with backend="ascend".

Runs on the CPU (and on CUDA if one is present): compiles, serves prefill and decode
steps at a few batch sizes (the runtime pads each to its bucket), and prints the
stats, eager vs compiled latency and the largest logit difference from eager.

    python examples/quickstart.py
"""

import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    )
    model = Qwen3ForCausalLM(config).to(device).eval()

    # No import of ascend_graph is needed: the backend is found through its entry point.
    compiled = torch.compile(model, backend="ascend", options={"buckets": [1, 2, 4, 8]})

    def step(m, ids, cache=None):
        with torch.no_grad():
            out = m(input_ids=ids, past_key_values=cache, use_cache=True)
        return out.logits, out.past_key_values

    worst = 0.0
    start = time.perf_counter()
    for batch in (2, 3):  # batch 3 runs padded in bucket 4
        ids = torch.randint(0, config.vocab_size, (batch, 12), device=device)
        ref, ref_cache = step(model, ids)
        out, out_cache = step(compiled, ids)
        worst = max(worst, (ref - out).abs().max().item())
        nxt = ref[:, -1:].argmax(-1)
        for _ in range(3):
            ref, ref_cache = step(model, nxt, ref_cache)
            out, out_cache = step(compiled, nxt, out_cache)
            worst = max(worst, (ref - out).abs().max().item())
            nxt = ref[:, -1:].argmax(-1)
    compile_and_first_runs = time.perf_counter() - start

    # Steady-state latency of one forward (the graphs are compiled and captured now).
    ids = torch.randint(0, config.vocab_size, (3, 12), device=device)

    def timed(m, reps=20):
        step(m, ids)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            step(m, ids)
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps * 1e3

    eager_ms, compiled_ms = timed(model), timed(compiled)

    import ascend_graph

    stats = ascend_graph.stats()
    print(f"device: {device}")
    print(f"compile + first runs: {compile_and_first_runs:.1f} s")
    print(f"latency, batch 3 x 12 tokens: eager {eager_ms:.2f} ms, ascend {compiled_ms:.2f} ms")
    print(f"max |logit difference| vs eager: {worst:.2e}")
    print("stats:")
    for key in ("graphs_compiled", "compile_seconds", "fusions", "buckets_captured", "replays", "eager_fallbacks", "padding"):
        print(f"  {key}: {stats[key]}")
    assert worst < 1e-3, f"compiled output differs from eager by {worst}"


if __name__ == "__main__":
    main()
