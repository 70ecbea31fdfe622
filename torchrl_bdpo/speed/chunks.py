"""Ensemble calls in row chunks that stay in a CPU's cache: the same values as one call."""

from __future__ import annotations

from typing import Sequence

import torch
from tensordict import TensorDictBase
from torch import nn

from torchrl_bdpo.ensemble import ensemble_apply
from torchrl_bdpo.speed.options import SpeedOptions


def ensemble_call(
    module: nn.Module, params: TensorDictBase, inputs: Sequence[torch.Tensor], size: int, options: SpeedOptions, *, use_vmap: bool = True
) -> torch.Tensor:
    """:func:`~torchrl_bdpo.ensemble.ensemble_apply`, in row chunks where ``options`` say so.

    Eager calls chunk CPU inputs over ``options.chunk_rows(size)`` rows; compiled calls chunk
    only with ``options.ensemble_chunk_compile`` (each chunk one compiled graph, outside the
    caller's graph), and otherwise run in one call inside the caller's graph.
    """
    sizes = None
    compiling = torch.compiler.is_compiling()
    if not compiling or options.ensemble_chunk_compile is not None:
        sizes = chunk_sizes(inputs, options.chunk_rows(size))
    if sizes is None:
        return ensemble_apply(module, params, inputs, size, use_vmap=use_vmap)
    return ensemble_apply_chunked(module, params, inputs, size, sizes, use_vmap=use_vmap, compile_options=options.ensemble_chunk_compile if compiling else None)


def chunk_sizes(inputs: Sequence, max_rows: int | None) -> list[int] | None:
    """How to split the leading dim so that each chunk holds at most ``max_rows`` samples.

    A sample is one row of the batch dims (an input ``[B, M, d]`` has ``M`` per leading entry; a
    step input ``[B, M]`` has one). Returns the chunk lengths along the leading dim, near-equal
    (two lengths at most, one when they divide it, so that a compiled chunk is reused), or
    ``None`` when the call is not to be split: no limit, a call that fits, or inputs that are
    not CPU tensors sharing their leading dim.
    """
    if max_rows is None or not inputs:
        return None
    lead, per_entry = None, 1
    for x in inputs:
        if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.device.type != "cpu":
            return None
        if lead is None:
            lead = x.shape[0]
        elif x.shape[0] != lead:
            return None
        if x.ndim >= 2:
            per_entry = max(per_entry, x.shape[1:-1].numel())
    entries = max(1, max_rows // per_entry)
    if lead <= entries:
        return None
    num_chunks = -(-lead // entries)
    size, extra = divmod(lead, num_chunks)
    return [size + 1] * extra + [size] * (num_chunks - extra)


def _ensemble_members(module, params, inputs, size, use_vmap):
    # compiled on its own (not ensemble_apply itself): dynamo keeps its graphs per code object,
    # and ensemble_apply is also traced inside the losses' graphs
    return ensemble_apply(module, params, inputs, size, use_vmap=use_vmap)


_COMPILED_MEMBERS: dict = {}

# Every chunk shape of every chunked call (Q and V, with and without grad, each loss of the
# process) is one static-shape graph of the one function above: a single compiled update needs
# ~5 at the D4RL sizes, two updates in one process (a benchmark's variants) exceed dynamo's
# default limit of 8 per function, after which it would run the remaining chunks eagerly.
CHUNK_RECOMPILE_LIMIT = 64


@torch.compiler.disable
def ensemble_apply_chunked(
    module: nn.Module,
    params: TensorDictBase,
    inputs: Sequence[torch.Tensor],
    size: int,
    sizes: Sequence[int],
    *,
    use_vmap: bool = True,
    compile_options: dict | None = None,
) -> torch.Tensor:
    """:func:`ensemble_apply` on chunks of the inputs' leading dim (``sizes``, from
    :func:`chunk_sizes`), concatenated: ``[size, *out]``.

    The same values as one call, up to float rounding. A CPU runs an ensemble over many rows
    faster this way: each chunk's ``[size, rows, hidden]`` activations stay in its cache instead
    of going through memory between layers. Always eager to ``torch.compile`` (a graph
    break): a compiled caller traces around it. ``compile_options`` (``torch.compile`` keyword
    arguments, ``{}`` for the defaults) compile the per-chunk call itself — one graph, reused by
    every chunk of that shape, up to :data:`CHUNK_RECOMPILE_LIMIT` graphs; ``None`` runs the
    chunks eagerly.
    """
    chunks = zip(*(x.split(list(sizes)) for x in inputs))
    if compile_options is None:
        return torch.cat([_ensemble_members(module, params, xs, size, use_vmap) for xs in chunks], 1)
    key = repr(sorted(compile_options.items()))  # values may be unhashable (an options dict)
    fn = _COMPILED_MEMBERS.get(key)
    if fn is None:
        fn = _COMPILED_MEMBERS[key] = torch.compile(_ensemble_members, dynamic=False, **compile_options)
    limit = max(torch._dynamo.config.recompile_limit, CHUNK_RECOMPILE_LIMIT)
    with torch._dynamo.config.patch(recompile_limit=limit):
        return torch.cat([fn(module, params, xs, size, use_vmap) for xs in chunks], 1)
