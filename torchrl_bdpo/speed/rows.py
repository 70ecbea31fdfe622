"""The target ``V_0 = Q`` on ~``B / N`` rows instead of ``B``, with static shapes, for compiled CPU steps.

The V and actor objectives read ``V_{n-1}`` at ``(s, a^{n-1})`` with ``V_0 = Q``
(docs/design.md). With steps ``n ~ U{1..N}`` only ~``B / N`` rows have ``n - 1 = 0``, but a
static graph evaluates Q on all ``B`` and selects with ``torch.where``. On a CPU, counting those
rows is a free host read (a graph break under ``torch.compile``), after which Q runs on a fixed
number of rows, :func:`q_row_capacity`, that holds them in all but ~1e-9 of batches. A
``fullgraph=True`` compile of ``value_loss`` / ``actor_loss`` on a CPU therefore fails on batches
above the capacity (256 rows at ``N = 5``: Q on 94 rows), at the graph break; turn it off with
``SpeedOptions(q_target_rows=False)``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def q_row_capacity(num_rows: int, num_steps: int) -> int:
    """Rows of ``V_0 = Q`` to evaluate: the mean count of ``n - 1 = 0`` for ``n ~ U{1..N}`` plus
    6 standard deviations (and 4), at most ``num_rows``."""
    p = 1.0 / num_steps
    mean = num_rows * p
    return min(num_rows, math.ceil(mean + 6.0 * math.sqrt(mean * (1.0 - p)) + 4.0))


def q_capacity_for(step_prev: torch.Tensor, num_steps: int) -> int | None:
    """The rows a static CPU graph evaluates Q on, or ``None`` for all (then ``torch.where``).

    CPU tensors only, and only when the rows with ``n - 1 = 0`` fit: counting them is a host
    read, which a CUDA graph cannot hold and which is free on a CPU. A compiled graph breaks
    here and goes on in one of two graphs (the capacity's or the full one).
    """
    if step_prev.device.type != "cpu" or step_prev.ndim < 2:
        return None
    num_rows = step_prev[..., 0].numel()
    capacity = q_row_capacity(num_rows, num_steps)
    if capacity >= num_rows or int((step_prev == 0).any(-1).sum()) > capacity:
        return None
    return capacity


def next_value_q_rows(
    qvalue: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    value: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    observation: torch.Tensor,
    action_prev: torch.Tensor,
    step_prev: torch.Tensor,
    capacity: int,
) -> torch.Tensor:
    """``V_{n-1}`` with ``V_0 = Q`` (``[K, *B, M]``), static shapes, Q on ``capacity`` rows.

    ``qvalue(obs, act)`` and ``value(obs, act, step)`` are the target ensembles (``[K, ...]``).
    A row is one state's ``M`` samples (one step for all of them in BDPO's objective). A stable
    sort puts the rows holding a sample with ``n - 1 = 0`` first; Q runs on the first
    ``capacity`` rows (all of those, then padding) and its values replace V's on the samples
    with ``n - 1 = 0``.
    """
    M = step_prev.shape[-1]
    batch = step_prev.shape[:-1]
    rows = batch.numel()
    flat_obs = observation.reshape(rows, M, observation.shape[-1])
    flat_act = action_prev.reshape(rows, M, action_prev.shape[-1])
    is_q = step_prev.reshape(rows, M) == 0
    v = value(observation, action_prev, step_prev).reshape(-1, rows, M)
    idx = torch.argsort((~is_q.any(-1)).to(torch.int8), stable=True)[:capacity]
    q = qvalue(flat_obs[idx], flat_act[idx])  # [K, capacity, M]
    picked = torch.where(is_q[idx], q, v[:, idx])
    return v.index_copy(1, idx, picked).reshape(-1, *batch, M)
