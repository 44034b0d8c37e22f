"""AOT tracing of a Dynamo graph into a functional ATen inference graph.

Entry point: :func:`aot_trace`. It calls ``aot_module_simplified`` with inductor's
decomposition table (so the graph our passes see is the one inductor lowers, and the
patterns, traced with the same table, match it), under ``torch.no_grad()`` so the result
is an inference graph, with input mutations (KV-cache writes) kept inside the graph as
trailing ``copy_`` nodes: a captured device graph then performs them on replay.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

__all__ = ["aot_trace", "decompositions", "make_boxed_func"]


def decompositions() -> dict[Any, Callable[..., Any]]:
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


def aot_trace(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    fw_compiler: Callable[[torch.fx.GraphModule, Sequence[Any]], Callable[..., Any]],
) -> Callable[..., Any]:
    """Trace ``gm`` to ATen, hand the graph to ``fw_compiler``, return the runnable."""
    with torch.no_grad():
        return aot_module_simplified(
            gm,
            list(example_inputs),
            fw_compiler=fw_compiler,
            decompositions=decompositions(),
            keep_inference_input_mutations=True,
        )
