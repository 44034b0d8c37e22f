"""A 4-layer Llama-class model for warm-start tests and ``benchmarks/warm_start.py``.

``make()`` is an ``ascend-graph build`` factory (``tests.cache.llama_factory:make``): a
random-weight ``LlamaForCausalLM`` (4 layers, hidden 64, GQA 4/2 heads) and an example
batch of 4 x 16 tokens. Run as a module, it is one fresh serving process::

    python -m tests.cache.llama_factory CACHE_DIR|none FIRST_BATCH OPTIONS_JSON

It compiles the model with ``backend="ascend"`` (``cache_dir`` plus the given options),
times the first call at ``FIRST_BATCH`` (compile included; imports and the model build
are not), and prints one JSON line: seconds, the cache events, ``stats()["cache"]``,
the buckets the runner served, and the largest difference from eager.
"""

from __future__ import annotations

import json
import sys
import time

import torch

VOCAB = 256
SEQ = 16


def make():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "use_cache": False}


def first_call(cache_dir: str | None, batch: int, options: dict) -> dict:
    import ascend_graph
    import ascend_graph.backend  # noqa: F401 - what torch.compile(backend="ascend") imports: an import, not the call
    import ascend_graph.cache as cache

    model, inputs = make()
    ids = inputs["input_ids"][torch.arange(batch) % 4]
    opts = dict(options)
    if cache_dir is not None:
        opts["cache_dir"] = cache_dir
    start = time.perf_counter()
    compiled = torch.compile(model, backend="ascend", options=opts)
    with cache.record_events() as events, torch.no_grad():
        out = compiled(input_ids=ids, use_cache=False).logits
    seconds = time.perf_counter() - start
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    stats = ascend_graph.stats()
    from torch._dynamo.utils import compilation_time_metrics as metrics

    return {
        # Dynamo's whole compile (traces, restarts, our backend) and our backend alone
        "dynamo_seconds": sum(metrics.get("_compile.compile_inner", [])),
        "backend_seconds": sum(metrics.get("OutputGraph.call_user_compiler", [])),
        "seconds": seconds,
        "events": [[e.status, list(e.changed), e.detail] for e in events],
        "cache": stats["cache"],
        "graphs_compiled": stats["graphs_compiled"],
        "max_err": float((out - ref).abs().max()),
    }


if __name__ == "__main__":
    directory, size, opts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    print(json.dumps(first_call(None if directory == "none" else directory, size, opts)))
