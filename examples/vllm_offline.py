"""Offline generation with vLLM's engine compiling the model through ascend-graph.

Runs as written on a CPU machine with vLLM's CPU build (install: docs/vllm.md), on a GPU
with vLLM, and on an Ascend NPU with vllm-ascend:

    python examples/vllm_offline.py                          # a tiny random Qwen3, built here
    python examples/vllm_offline.py --model Qwen/Qwen3-0.6B  # a real checkpoint (downloads it)

``compilation_config={"mode": 2, "backend": "ascend"}`` (``DYNAMO_TRACE_ONCE``): vLLM hands
the whole model graph to the ``ascend`` Dynamo backend, which learns vLLM's settings
(capture sizes, speculative tokens) from the engine and runs vLLM's op fusions. vLLM's
AOT compile (on by default) saves the compiled graph, so a second run starts warm.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def tiny_checkpoint() -> str:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = os.path.join(tempfile.gettempdir(), "ascend-graph-example-qwen3")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        cfg = Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512)
        Qwen3ForCausalLM(cfg).save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="a checkpoint (default: a tiny random Qwen3 saved to a temp dir)")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: stats() below see it

    from vllm import LLM, SamplingParams

    import ascend_graph

    tiny = args.model is None
    model = args.model or tiny_checkpoint()
    kwargs = dict(model=model, compilation_config={"mode": 2, "backend": "ascend"})
    if tiny:  # random weights have no tokenizer: prompts are token ids; a small KV cache
        kwargs.update(skip_tokenizer_init=True, max_model_len=256, dtype="float32", gpu_memory_utilization=0.05, kv_cache_memory_bytes=1 << 26)
    start = time.perf_counter()
    llm = LLM(**kwargs)
    print(f"engine started in {time.perf_counter() - start:.1f} s")
    prompts = [{"prompt_token_ids": [1, 5, 7, 9, 11]}] if tiny else ["The capital of France is"]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, detokenize=not tiny)
    out = llm.generate(prompts, params)[0].outputs[0]
    print("generated:", out.token_ids if tiny else out.text)
    s = ascend_graph.stats()
    print("graphs compiled:", s["graphs_compiled"], "| loaded from vLLM's AOT cache:", s["precompiled"]["loaded"])
    print("fusions:", {k: v for k, v in s["fusions"].items() if v}, "| skipped (and why):", s["skipped"])


if __name__ == "__main__":
    main()
