"""Run vLLM's real engine once, in this process, and print one ``RESULT {json}`` line.

Used by test_vllm_engine.py in a fresh subprocess per engine (vLLM keeps process-wide
state, and a warm start must be a new process). Argument: a JSON object with ``model``
(a checkpoint dir), ``prompts`` (token id lists), and optional ``dtype``, ``max_tokens``,
``llm`` (extra ``vllm.LLM`` keywords: ``compilation_config``, ``speculative_config``),
``attention_on_cpu`` (the attention rewrite applied on the CPU although its per-device
policy leaves it out there: the rewrite itself proven in the real engine).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    import ascend_graph

    if spec.get("attention_on_cpu"):
        from ascend_graph.integrations import vllm_ops

        vllm_ops.ATTENTION_SKIPPED_ON.pop("cpu", None)

    host_options: list = []
    if spec.get("record_host_options"):
        from ascend_graph import plugins
        from ascend_graph.integrations import vllm as agv

        def record() -> None:
            config = agv._current_vllm_config()
            if config is not None:
                host_options.append(agv.options_from_vllm(config))
            return None

        plugins.register_host(record)

    kwargs = dict(
        model=spec["model"],
        skip_tokenizer_init=True,
        dtype=spec.get("dtype", "float32"),
        max_model_len=256,
        # the CPU platform reads this as the share of host memory to reserve: keep it
        # small and size the KV cache explicitly (the test machine is shared)
        gpu_memory_utilization=0.05,
        kv_cache_memory_bytes=1 << 26,
        seed=0,
    )
    kwargs.update(spec.get("llm", {}))
    start = time.perf_counter()
    llm = LLM(**kwargs)
    start_seconds = time.perf_counter() - start
    params = SamplingParams(max_tokens=spec.get("max_tokens", 12), temperature=0.0, detokenize=False, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params, use_tqdm=False)
    s = ascend_graph.stats()
    cc = llm.llm_engine.vllm_config.compilation_config
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "start_seconds": start_seconds,
        "mode": getattr(cc.mode, "name", str(cc.mode)),
        "backend": cc.backend,
        "graphs_compiled": s["graphs_compiled"],
        "fusions": s["fusions"],
        "rewrites": {name: p["rewrites"] for name, p in s["passes"].items()},
        "precompiled": s["precompiled"],
        "skipped": s["skipped"],
        "buckets_captured": s["buckets_captured"],
        "replays": s["replays"],
        "host_options": host_options[:1],
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
