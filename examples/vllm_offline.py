"""Offline generation with vLLM compiling the model through ascend-graph.

Needs a GPU (CUDA build of vLLM) or an NPU (vllm-ascend): ``LLM(...)`` loads a real
model and runs vLLM's engine, which the CPU-only development install of vLLM (see
docs/vllm.md) cannot do. On the CPU, tests/integrations/test_vllm.py drives the same
adapters through vLLM's config, compiler manager, pass manager, forward context and
its LlamaModel class instead.

    python examples/vllm_offline.py --model Qwen/Qwen3-0.6B

Route 1 (here): ``mode=DYNAMO_TRACE_ONCE`` with our backend. vLLM passes no options to
a string backend, so the backend reads vLLM's ``cudagraph_capture_sizes`` from the
current vLLM config (``ascend_graph.integrations.vllm.options_from_vllm``).
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="Qwen/Qwen3-0.6B")
    parser.add_argument("--backend", default="ascend_graph.integrations.vllm.ascend_vllm_backend", help='or "ascend" (the torch_dynamo_backends entry point)')
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.config import CompilationConfig, CompilationMode

    import ascend_graph

    llm = LLM(
        model=args.model,
        compilation_config=CompilationConfig(
            mode=CompilationMode.DYNAMO_TRACE_ONCE,
            backend=args.backend,
            cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32],
        ),
    )
    outputs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0.0))
    print(outputs[0].outputs[0].text)
    print({k: v for k, v in ascend_graph.stats().items() if k in ("graphs_compiled", "fusions")})


if __name__ == "__main__":
    main()
