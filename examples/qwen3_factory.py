"""A ``MODULE:FACTORY`` example for ``ascend-graph build``: a small random-weight Qwen3.

Usage (from the repository root, so ``examples`` is importable)::

    ascend-graph build examples.qwen3_factory:tiny --buckets 1,2,4,8 --cache-dir /tmp/ag-cache
    ascend-graph inspect /tmp/ag-cache

A factory takes no arguments and returns ``(model, example_inputs)``: the model in
eval mode, and its inputs as a dict of keyword arguments (or a tuple of positional
ones) whose batch dim (dim 0 unless ``-o batch_dim=N``) the builder resizes to each
bucket. Weights are random (``from_config``): nothing is downloaded.
"""

from __future__ import annotations

import torch


def qwen3(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, vocab: int = 1024, seq_len: int = 16, intermediate: int | None = None):
    """A Qwen3-shaped causal LM of the given size and an example batch of one sequence."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=4 * seq_len,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
    # use_cache=False: the graph is one forward over the whole sequence (no HF cache
    # object crossing the graph boundary).
    return model, {"input_ids": ids, "use_cache": False}


def tiny():
    """2 layers, hidden 64: compiles in seconds on a laptop CPU."""
    return qwen3(layers=2, hidden=64)


def small():
    """4 layers, hidden 256: the CPU warm-start benchmark model."""
    return qwen3(layers=4, hidden=256, heads=8, kv_heads=4, vocab=4096, seq_len=32)


def medium():
    """8 layers, hidden 1024: the CUDA warm-start benchmark model."""
    return qwen3(layers=8, hidden=1024, heads=16, kv_heads=8, vocab=32768, seq_len=64)
