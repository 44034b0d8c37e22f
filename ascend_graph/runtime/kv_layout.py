"""Paged KV caches laid out per layer or across layers, and block moves between them.

Entry point: :func:`allocate` -> :class:`KVCaches`; ``caches.layer(i)`` gives layer
``i``'s ``(k_cache, v_cache)`` in the shape every paged op takes
(``[num_blocks, block_size, kv_heads, D]``), and :meth:`KVCaches.copy_blocks` moves whole
blocks (all layers) between two caches of the same geometry, e.g. device <-> pinned host.

Layouts (``layout=``):

- ``"per_layer"``: one contiguous tensor per layer for K and one for V (what the ops
  have always been given). Moving a block costs ``2 x num_layers`` copies.
- ``"cross_layer"``: one tensor for K and one for V, each
  ``[num_blocks, num_layers, block_size, kv_heads, D]``: a block holds that block's
  keys (values) of every layer contiguously, so moving a block costs 2 copies. This is
  vLLM 0.32's block-outermost ``KVCacheLayout.BLNHC`` order ([B, L, N, H, C] in
  ``vllm/v1/kv_cache_layout.py``) with K and V in two tensors instead of packed into one
  content dim, the layout vllm-ascend's stalled change used.
- ``"cross_layer_packed"``: vLLM 0.32's own BLNHC exactly: one tensor
  ``[num_blocks, num_layers, block_size, kv_heads, D + Dv]`` (K then V in the content
  dim); one copy per block. Layer views are strided in the head dim as well (head
  stride ``D + Dv``), which some NPU ops cannot take (see ``ops/kernels/npu/attention.py``).

Invariants: per-layer views are views (``.layer(i)`` never copies; a write through
the view lands in the shared tensor); K and V head sizes are separate arguments and
never derived by halving anything (MLA stores ``kv_lora_rank`` and
``qk_rope_head_dim`` parts of different sizes); the last dim of every view is
contiguous (the kernels' one layout requirement).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..errors import ConfigError, UnsupportedError

__all__ = ["LAYOUTS", "KVCaches", "allocate", "cross_layer_block_stride"]

log = logging.getLogger("ascend_graph.runtime.kv_layout")

LAYOUTS = ("per_layer", "cross_layer", "cross_layer_packed")


@dataclass(frozen=True)
class KVCaches:
    """Paged K/V caches of ``num_layers`` layers in one of :data:`LAYOUTS`.

    ``k`` / ``v`` hold the storage: a list of per-layer tensors (``per_layer``), one
    5-D tensor each (``cross_layer``), or one packed 5-D tensor shared by both
    (``cross_layer_packed``: ``k is v``).
    """

    layout: str
    k: Union[torch.Tensor, list[torch.Tensor]]
    v: Union[torch.Tensor, list[torch.Tensor]]
    num_layers: int
    num_blocks: int
    block_size: int
    kv_heads: int
    head_size: int
    head_size_v: int

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s ``(k_cache, v_cache)``, each ``[num_blocks, block_size, kv_heads, D]``: views, never copies."""
        if not 0 <= i < self.num_layers:
            raise ConfigError("layer index out of range", expected=f"0 <= i < {self.num_layers}", got=i)
        if self.layout == "per_layer":
            return self.k[i], self.v[i]
        if self.layout == "cross_layer":
            return self.k[:, i], self.v[:, i]
        packed = self.k[:, i]
        return packed[..., : self.head_size], packed[..., self.head_size :]

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.layer(i) for i in range(self.num_layers)]

    def _block_tensors(self) -> list[torch.Tensor]:
        """The tensors whose dim 0 is the block id (one per layer and K/V, or one or two in all)."""
        if self.layout == "per_layer":
            return [*self.k, *self.v]
        if self.layout == "cross_layer":
            return [self.k, self.v]
        return [self.k]

    def copies_per_block(self) -> int:
        """Device copies :meth:`copy_blocks` issues per block moved."""
        return len(self._block_tensors())

    def copy_blocks(self, dst: "KVCaches", src_ids: Sequence[int], dst_ids: Sequence[int], *, non_blocking: bool = True) -> int:
        """Copy blocks ``src_ids`` of this cache into blocks ``dst_ids`` of ``dst`` (all
        layers, K and V); returns the number of copies issued (one per block and tensor:
        ``2 x layers`` per block per layer, 2 or 1 across layers). ``dst`` must have the
        same layout and geometry (block count aside), e.g. a pinned host copy from
        :func:`allocate` with ``device="cpu", pin_memory=True``. With ``non_blocking``
        the copies are queued on the current stream: synchronize it before reading the
        destination on the host."""
        if len(src_ids) != len(dst_ids):
            raise ConfigError("copy_blocks needs one destination per source block", expected=len(src_ids), got=len(dst_ids))
        mine, theirs = self._geometry(), dst._geometry()
        if mine != theirs:
            raise UnsupportedError("copy_blocks between caches of different geometry", expected=mine, got=theirs)
        copies = 0
        for src_t, dst_t in zip(self._block_tensors(), dst._block_tensors()):
            for s, d in zip(src_ids, dst_ids):
                dst_t[d].copy_(src_t[s], non_blocking=non_blocking)
                copies += 1
        return copies

    def _geometry(self) -> tuple:
        return (self.layout, self.num_layers, self.block_size, self.kv_heads, self.head_size, self.head_size_v)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._block_tensors())


def allocate(
    layout: str,
    *,
    num_layers: int,
    num_blocks: int,
    block_size: int,
    kv_heads: int,
    head_size: int,
    head_size_v: Optional[int] = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    pin_memory: bool = False,
) -> KVCaches:
    """Zeroed paged K/V caches for ``num_layers`` layers in ``layout`` (see the module doc).

    ``head_size_v`` defaults to ``head_size``; give it for MLA-style caches whose two
    parts differ (e.g. 512 and 64). ``pin_memory`` (host tensors only) makes the
    device <-> host copies of :meth:`KVCaches.copy_blocks` asynchronous.
    """
    if layout not in LAYOUTS:
        raise ConfigError("unknown KV cache layout", expected=LAYOUTS, got=layout)
    dims = dict(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size, kv_heads=kv_heads, head_size=head_size)
    if head_size_v is None:
        head_size_v = head_size
    dims["head_size_v"] = head_size_v
    bad = {k: v for k, v in dims.items() if int(v) <= 0}
    if bad:
        raise ConfigError("KV cache dims must be positive", expected="every dim > 0", got=bad)
    kw = dict(dtype=dtype, device=device, pin_memory=pin_memory)
    if layout == "per_layer":
        k = [torch.zeros(num_blocks, block_size, kv_heads, head_size, **kw) for _ in range(num_layers)]
        v = [torch.zeros(num_blocks, block_size, kv_heads, head_size_v, **kw) for _ in range(num_layers)]
    elif layout == "cross_layer":
        k = torch.zeros(num_blocks, num_layers, block_size, kv_heads, head_size, **kw)
        v = torch.zeros(num_blocks, num_layers, block_size, kv_heads, head_size_v, **kw)
    else:
        k = v = torch.zeros(num_blocks, num_layers, block_size, kv_heads, head_size + head_size_v, **kw)
    return KVCaches(layout, k, v, num_layers, num_blocks, block_size, kv_heads, head_size, head_size_v)


def cross_layer_block_stride(cache: torch.Tensor) -> Optional[int]:
    """How many ``[block_size, heads, D]`` blocks apart consecutive blocks of ``cache``
    (``[num_blocks, block_size, heads, D]``) lie in memory, when each block itself is
    contiguous: 1 for a contiguous per-layer cache, ``num_layers`` for a
    ``cross_layer`` view. ``None`` when a block is not one contiguous run (the packed
    layout's views, whose head stride is ``D + Dv``) or blocks are not a whole number
    of blocks apart. The NPU bindings use it to hand their contiguous-only ops a
    contiguous alias of the whole storage instead of a copy."""
    if cache.dim() != 4:
        return None
    nb, bs, h, d = cache.shape
    block = bs * h * d
    inner_contiguous = cache.stride(3) == 1 and (h == 1 or cache.stride(2) == d) and (bs == 1 or cache.stride(1) == h * d)
    if not inner_contiguous:
        return None
    if nb == 1:
        return 1
    if cache.stride(0) % block != 0 or cache.stride(0) <= 0:
        return None
    return cache.stride(0) // block
