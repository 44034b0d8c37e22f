"""A whole HF model compiled with ``backend="ascend"``, with and without the fusions.

What the fusion families are worth at model level (issues: attention, causal conv): a
random-weight HF ``Qwen3ForCausalLM`` or ``Qwen3NextForCausalLM`` with real model dims and
a few layers, bf16, with transformers' ``StaticCache`` (the cache HF documents for
``torch.compile``), timed for

- prefill: one sequence of ``--prefill`` tokens written into an empty cache;
- decode: one token per request at batch 1..N, every request with ``--context`` tokens
  already in the cache (written eagerly, the same for every row); the timed steps go on
  from there one position at a time (a static cache keeps every shape fixed, so each
  step replays the same graph).

Rows, in the same run: eager; ``backend="ascend"`` with every fusion family on (the
default); ``backend="ascend"`` with ``fusions=[]`` (the same pipeline, passes off); and
``torch.compile`` with inductor's default backend. Both ascend rows use inductor codegen
and the device-graph runtime (one graph per shape: ``dynamic=False``); the inductor row
runs without CUDA graphs (``mode=None``) and with them (``reduce-overhead``). Each
compiled row is checked against eager (max abs logit difference), and the fusion counts of
the fused row are printed.

    python benchmarks/model_fusion.py --arch qwen3 [--layers 4] [--batches 1,8,32]
    python benchmarks/model_fusion.py --arch qwen3_next --layers 4 --no-prefill
    python benchmarks/model_fusion.py --arch qwen3 --tiny --device cpu   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ascend_graph


def make_config(arch: str, layers: int, tiny: bool):
    import transformers

    if arch == "qwen3":
        dims = dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936)
        if tiny:
            dims = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128)
        cfg = transformers.Qwen3Config(num_hidden_layers=layers, max_position_embeddings=8192, **dims)
        return cfg, transformers.Qwen3ForCausalLM
    if arch == "qwen3_next":
        # Qwen3-Next-80B-A3B's attention and gated-delta-net dims; a dense MLP in every layer
        # (mlp_only_layers) so that the rows measure the attention/conv/delta-rule paths,
        # not 512 random experts
        dims = dict(
            hidden_size=2048, intermediate_size=5120, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
            linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
            vocab_size=151936,
        )
        if tiny:
            dims = dict(
                hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                vocab_size=128,
            )
        cfg = transformers.Qwen3NextConfig(
            num_hidden_layers=layers, full_attention_interval=4, linear_conv_kernel_dim=4,
            mlp_only_layers=list(range(layers)), num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=64, shared_expert_intermediate_size=64, max_position_embeddings=8192, **dims,
        )
        return cfg, transformers.Qwen3NextForCausalLM
    raise SystemExit(f"--arch: expected qwen3 or qwen3_next, got {arch!r}")


def timed(fn, device: str, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls, after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen3")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tiny", action="store_true", help="tiny dims (a CPU smoke run)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rows", default="eager,ascend,ascend-nofusion,inductor,reduce-overhead")
    args = ap.parse_args()
    from transformers import StaticCache

    dev, dtype = args.device, getattr(torch, args.dtype)
    cfg, cls = make_config(args.arch, args.layers, args.tiny)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        model = cls(cfg).to(dtype).eval()
    rows = args.rows.split(",")
    print(f"# {args.arch}: {args.layers} layers, hidden {cfg.hidden_size}, {args.dtype}, device {dev}"
          + (f" ({torch.cuda.get_device_name()}, torch {torch.__version__})" if dev == "cuda" else f" (torch {torch.__version__})"))
    print(f"# layer types: {getattr(cfg, 'layer_types', None)}")

    def compiled(row: str):
        torch._dynamo.reset()
        if row == "eager":
            return model
        if row == "ascend":
            return torch.compile(model, backend="ascend", dynamic=False)
        if row == "ascend-nofusion":
            return torch.compile(model, backend="ascend", dynamic=False, options={"fusions": []})
        if row == "inductor":
            return torch.compile(model, dynamic=False)
        if row == "reduce-overhead":
            return torch.compile(model, mode="reduce-overhead", dynamic=False)
        raise SystemExit(f"--rows: unknown row {row!r}")

    cases = [] if args.no_prefill else [("prefill", 1, args.prefill)]
    cases += [("decode", int(b), args.context) for b in args.batches.split(",")]
    print("\n| step | batch | tokens in cache | row | ms | vs eager | max abs diff vs eager | fusions | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, batch, ctx in cases:
        max_len = ctx + args.reps + 16
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, cfg.vocab_size, (batch, ctx), generator=g).to(dev)
        step_ids = torch.randint(0, cfg.vocab_size, (batch, 1), generator=g).to(dev)

        def fresh_cache():
            return StaticCache(config=cfg, max_cache_len=max_len)

        with torch.no_grad():
            ref_cache = fresh_cache()
            if kind == "prefill":
                ref = model(input_ids=prompt, past_key_values=ref_cache, use_cache=True).logits
            else:
                model(input_ids=prompt, past_key_values=ref_cache, use_cache=True)
            base_ms = None
            for row in rows:
                fn_model = compiled(row)
                ascend_graph.reset_stats()
                cache = fresh_cache()
                t0 = time.perf_counter()
                if kind == "prefill":
                    # the cache allocates itself on its first write: do that eagerly, so the
                    # compiled graphs see an initialised cache (one graph, no recompile)
                    # (then every cache tensor goes back to zero: for hybrid models the prefill
                    # then reads a zero initial conv/recurrent state, numerically a fresh prefill)
                    model(input_ids=prompt[:, :1], past_key_values=cache, use_cache=True)
                    for t in _cache_tensors(cache):
                        t.zero_()
                    out = fn_model(input_ids=prompt, past_key_values=cache, use_cache=True).logits

                    def call():  # every prefill starts from an empty cache (the lengths go back to 0)
                        for t in _cache_tensors(cache, ("cumulative_length",)):
                            t.zero_()
                        return fn_model(input_ids=prompt, past_key_values=cache, use_cache=True).logits
                else:
                    # the context goes in eagerly (identical cache contents for every row);
                    # the compiled model runs the decode step only
                    model(input_ids=prompt, past_key_values=cache, use_cache=True)
                    snapshot = [t.clone() for t in _cache_tensors(cache)]
                    call = lambda: fn_model(input_ids=step_ids, past_key_values=cache, use_cache=True).logits  # noqa: E731
                    out = call()
                    _restore(cache, snapshot)
                    ref = model(input_ids=step_ids, past_key_values=_restored(ref_cache, snapshot), use_cache=True).logits
                    # the timed steps go on from there: positions ctx+1, ctx+2, ... (a static
                    # cache keeps every shape, so each step replays the same graph)
                if dev == "cuda":
                    torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
                diff = (out.float() - ref.float()).abs().max().item()
                ms = timed(call, dev, args.reps) * 1e3
                base_ms = ms if row == "eager" else base_ms
                fus = ascend_graph.stats()["fusions"] if row.startswith("ascend") else {}
                fus_s = ",".join(f"{k}={v}" for k, v in fus.items() if v) or "-"
                vs = f"{base_ms / ms:.2f}x" if base_ms else "-"
                print(f"| {kind} | {batch} | {ctx} | {row} | {ms:.2f} | {vs} | {diff:.3g} | {fus_s} | {compile_s if row != 'eager' else 0:.1f} |", flush=True)
                del fn_model


def _cache_tensors(cache, names=("keys", "values", "conv_states", "recurrent_states", "cumulative_length")) -> list[torch.Tensor]:
    out = []
    for layer in cache.layers:
        for name in names:
            t = getattr(layer, name, None)
            items = t.values() if isinstance(t, dict) else t if isinstance(t, (list, tuple)) else [t]
            out.extend(x for x in items if isinstance(x, torch.Tensor))
    return out


def _restore(cache, snapshot: list[torch.Tensor]) -> None:
    for t, s in zip(_cache_tensors(cache), snapshot):
        t.copy_(s)


def _restored(cache, snapshot: list[torch.Tensor]):
    _restore(cache, snapshot)
    return cache


if __name__ == "__main__":
    main()
