"""An MTP draft step compiled with backend="ascend", replayed across drafter buckets.

The drafter is transformers' ``MtpLayer`` (the DeepSeek-V3 multi-token-prediction layer:
``eh_proj(cat[enorm(embed(tokens)), hnorm(hidden)])`` -> one decoder layer -> norm) around
a Qwen3 decoder layer whose attention runs the way a serving engine runs it: tokens
flattened to ``[T]``, a paged KV cache written in place (``ascend_graph::reshape_and_cache``)
and paged attention in TND (``ascend_graph::paged_attention``, FIA's contract on an NPU).
Tiny random weights; no download.

One draft step takes the verify step's batch as it is: every request has exactly ``1+k``
tokens (uniform), ``num_valid[r]`` of them accepted (the accepted ones plus the bonus
token, vLLM's ``valid_sampled_tokens_count``). Nothing is sliced on the host: rejected
tokens stay in the batch as padding, masked in the graph (slot -1: they never write the
drafter's cache; the draft is read at each request's last valid token). The batch
symbol counts requests and the token dim is ``(1+k)*R``, so the runtime serves token
buckets that are multiples of ``1+k`` as request buckets and pads with dummy requests of
exactly ``1+k`` tokens (``runtime/padding.py``: T_pad == query_start_loc[-1]).

    python examples/mtp_draft.py [--k 2] [--codegen auto|fx|inductor]
"""

from __future__ import annotations

import argparse
import random
from typing import Sequence

import torch
from torch import nn
from transformers import Qwen3Config
from transformers.modeling_layers import MtpLayer
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding, apply_rotary_pos_emb

import ascend_graph
import ascend_graph.ops.attention  # noqa: F401  (registers torch.ops.ascend_graph.*)
from ascend_graph.runtime.padding import drafter_sample_indices, drafter_token_mask, mask_rejected_slots

ops = torch.ops.ascend_graph
BLOCK_SIZE = 8


def tiny_config() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
    )


class PagedQwen3DecoderLayer(nn.Module):
    """Qwen3's decoder layer (q/k RMSNorm, RoPE, GQA, SwiGLU MLP) over a paged KV cache.

    Takes ``MtpLayer``'s call (``hidden_states, attention_mask, position_embeddings, ...``)
    and the paged metadata as keyword arguments, which ``MtpLayer`` passes through.
    """

    def __init__(self, config: Qwen3Config, layer_idx: int, num_blocks: int = 128):
        super().__init__()
        self.nq, self.nkv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        h = config.hidden_size
        self.input_layernorm = Qwen3RMSNorm(h, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(h, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(h, self.nq * self.hd, bias=False)
        self.k_proj = nn.Linear(h, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(h, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nq * self.hd, h, bias=False)
        self.q_norm = Qwen3RMSNorm(self.hd, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(self.hd, eps=config.rms_norm_eps)
        self.mlp = Qwen3MLP(config)
        self.register_buffer("k_cache", torch.zeros(num_blocks, BLOCK_SIZE, self.nkv, self.hd), persistent=False)
        self.register_buffer("v_cache", torch.zeros(num_blocks, BLOCK_SIZE, self.nkv, self.hd), persistent=False)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, position_ids=None, past_key_values=None,
                *, slot_mapping, block_table, query_start_loc, seq_lens, **kwargs):
        t = hidden_states.shape[0]
        x = self.input_layernorm(hidden_states)
        q = self.q_norm(self.q_proj(x).view(t, self.nq, self.hd))
        k = self.k_norm(self.k_proj(x).view(t, self.nkv, self.hd))
        v = self.v_proj(x).view(t, self.nkv, self.hd)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)  # cos [T, D] -> [T, 1, D]
        ops.reshape_and_cache(k, v, self.k_cache, self.v_cache, slot_mapping)
        a = ops.paged_attention(q, self.k_cache, self.v_cache, block_table, query_start_loc, seq_lens, None, self.hd**-0.5, 0)
        hidden_states = hidden_states + self.o_proj(a.reshape(t, self.nq * self.hd))
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class MtpDrafter(nn.Module):
    """One MTP draft step over a padded drafter batch (uniform ``q = 1+k`` tokens a request)."""

    def __init__(self, config: Qwen3Config, num_speculative_tokens: int):
        super().__init__()
        self.q = 1 + num_speculative_tokens
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)  # shared with the target model in a real engine
        self.rotary_emb = Qwen3RotaryEmbedding(config)
        self.mtp = MtpLayer(config, PagedQwen3DecoderLayer, Qwen3RMSNorm, layer_idx=0)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids, hidden_states, positions, slot_mapping, block_table, query_start_loc, seq_lens, num_valid):
        r = seq_lens.shape[0]
        # The batch is uniform: saying so gives every dim the request count's symbol
        # (tokens = q*R), so the runtime pads all of them together, by whole requests.
        torch._check(input_ids.shape[0] == r * self.q)
        for per_token in (hidden_states, positions, slot_mapping):
            torch._check(per_token.shape[0] == input_ids.shape[0])
        for per_request in (block_table, num_valid):
            torch._check(per_request.shape[0] == r)
        torch._check(query_start_loc.shape[0] == r + 1)
        valid = drafter_token_mask(num_valid, self.q)  # rejected tokens (and dummy requests) masked
        embeds = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(embeds, positions[None])
        h = self.mtp(
            embeds, hidden_states, position_embeddings=(cos[0], sin[0]), attention_mask=None, position_ids=positions,
            past_key_values=None, slot_mapping=mask_rejected_slots(slot_mapping, valid), block_table=block_table,
            query_start_loc=query_start_loc, seq_lens=seq_lens,
        )
        logits = self.lm_head(h[drafter_sample_indices(num_valid, self.q)])  # each request's last valid token
        return logits.argmax(-1), logits


def drafter_batch(config: Qwen3Config, num_reqs: int, k: int, seed: int, max_blocks: int = 6):
    """A verify step's output as the drafter gets it: R requests of 1+k tokens, random
    context lengths (request r owns blocks [r*max_blocks, ...)), random acceptance.

    (``max_blocks`` must not equal the first batch's R+1: Dynamo gives equal sizes one
    symbol, and the block table's width would then be guarded to the request count.)"""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    q = 1 + k
    ctx = [rng.randint(0, max_blocks * BLOCK_SIZE - q) for _ in range(num_reqs)]
    block_table = (torch.arange(num_reqs)[:, None] * max_blocks + torch.arange(max_blocks)).int()
    positions = torch.tensor([c + j for c in ctx for j in range(q)])
    slot_mapping = torch.tensor([int(block_table[r, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE for r in range(num_reqs) for p in positions[r * q : (r + 1) * q].tolist()])
    return (
        torch.randint(0, config.vocab_size, (num_reqs * q,), generator=g),
        torch.randn(num_reqs * q, config.hidden_size, generator=g),
        positions,
        slot_mapping,
        block_table,
        torch.arange(0, num_reqs * q + 1, q, dtype=torch.int32),  # query_start_loc: uniform
        torch.tensor([c + q for c in ctx], dtype=torch.int32),  # KV length, this step's tokens included
        torch.tensor([rng.randint(1, q) for _ in range(num_reqs)], dtype=torch.int32),  # accepted + 1
    )


def run(batches: Sequence[int], k: int = 2, codegen: str = "auto", token_buckets: Sequence[int] = (3, 6, 12, 24, 48), seed: int = 0,
        fusions: Sequence[str] | None = None) -> dict:
    """Compile the draft step, serve ``batches`` (request counts) through it and against
    eager; returns the largest differences from eager and ascend-graph's stats.
    ``fusions``: the fusion families to run (None: all)."""
    torch.manual_seed(seed)
    config = tiny_config()
    drafter = MtpDrafter(config, k).eval()
    layer = drafter.mtp.mtp_block
    with torch.no_grad():  # a drafter cache with history in it
        layer.k_cache.normal_()
        layer.v_cache.normal_()
    options = {"codegen": codegen, "buckets": list(token_buckets), "num_speculative_tokens": k}
    if fusions is not None:
        options["fusions"] = list(fusions)
    compiled = torch.compile(drafter, backend="ascend", options=options, dynamic=True)
    ascend_graph.reset_stats()
    worst = {"logits": 0.0, "cache": 0.0, "tokens_differ": 0}
    for step, r in enumerate(batches):
        args = drafter_batch(config, r, k, seed=seed + step)
        before = (layer.k_cache.clone(), layer.v_cache.clone())
        with torch.no_grad():
            tokens, logits = compiled(*args)
            after = (layer.k_cache.clone(), layer.v_cache.clone())
            layer.k_cache.copy_(before[0])
            layer.v_cache.copy_(before[1])
            ref_tokens, ref_logits = drafter(*args)  # eager, unpadded: the ground truth
        worst["logits"] = max(worst["logits"], (logits - ref_logits).abs().max().item())
        worst["cache"] = max(worst["cache"], max((a - b).abs().max().item() for a, b in zip(after, (layer.k_cache, layer.v_cache))))
        worst["tokens_differ"] += int((tokens != ref_tokens).sum())
    return {"worst": worst, "stats": ascend_graph.stats()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=2, help="speculative tokens per request")
    parser.add_argument("--codegen", default="auto")
    a = parser.parse_args()
    batches = [3, 5, 2, 7, 4, 9, 16, 6, 3, 11]  # requests per draft step
    result = run(batches, k=a.k, codegen=a.codegen)
    st, worst = result["stats"], result["worst"]
    print(f"draft steps: {len(batches)} with {batches} requests, {1 + a.k} tokens each")
    reqs = sorted({int(key.split(":")[1].split("x")[0]) for key in st["buckets"]})
    print(f"buckets captured: {st['buckets_captured']} (requests {reqs} = tokens {[r * (1 + a.k) for r in reqs]})")
    print(f"replays: {st['replays']}, eager fallbacks: {st['eager_fallbacks']} {st['fallback_reasons'] or ''}")
    print(f"padded ratio: {st['padding']['padded_ratio']:.3f} ({st['padding']['padded_rows']} dummy requests / {st['padding']['real_rows']} real)")
    print(f"padding pass rewrites: {st['padding']['rewrites']}")
    print(f"max |logits - eager| = {worst['logits']:.2e}, max |cache - eager| = {worst['cache']:.2e}, draft tokens differing: {worst['tokens_differ']}")


if __name__ == "__main__":
    main()
