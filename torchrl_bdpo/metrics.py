"""Distances between sample sets, used to check learned distributions against exact ones, and a
sample-based entropy estimate."""

from __future__ import annotations

import math
from typing import Sequence

import torch


def _check_samples(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"samples of shapes {tuple(x.shape)} and {tuple(y.shape)}: expected two [num_samples, dim] tensors with the same dim.")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"need at least 2 samples on each side, got {x.shape[0]} and {y.shape[0]}.")


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0)) -> torch.Tensor:
    """Unbiased squared maximum mean discrepancy with a sum of RBF kernels.

    ``k(u, v) = sum_h exp(-||u - v||^2 / (2 h^2))``. Zero in expectation iff the two
    distributions are equal; can be slightly negative for finite samples.
    """
    _check_samples(x, y)
    x, y = x.double(), y.double()
    xx, yy, xy = torch.cdist(x, x).pow(2), torch.cdist(y, y).pow(2), torch.cdist(x, y).pow(2)
    k = lambda d: sum(torch.exp(-d / (2 * h * h)) for h in bandwidths)  # noqa: E731
    m, n = x.shape[0], y.shape[0]
    kxx = (k(xx).sum() - len(bandwidths) * m) / (m * (m - 1))
    kyy = (k(yy).sum() - len(bandwidths) * n) / (n * (n - 1))
    return (kxx + kyy - 2 * k(xy).mean()).float()


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sliced 2-Wasserstein distance over random unit directions.

    Both sets are projected onto ``num_projections`` directions; the 1D W2 on each
    compares sorted projections at matched quantiles (the larger set is subsampled
    at evenly spaced ranks when the sizes differ).
    """
    _check_samples(x, y)
    x, y = x.double(), y.double()
    dirs = torch.randn(x.shape[-1], num_projections, generator=generator, dtype=x.dtype)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ dirs, 0)
    py, _ = torch.sort(y @ dirs, 0)
    n = min(px.shape[0], py.shape[0])
    q = (torch.arange(n, dtype=x.dtype) + 0.5) / n
    px = px[(q * px.shape[0]).long()]
    py = py[(q * py.shape[0]).long()]
    return (px - py).pow(2).mean().sqrt().float()


def knn_entropy(x: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Differential entropy (nats) of the distribution of ``x`` (``[num_samples, dim]``), by the
    Kozachenko-Leonenko ``k``-nearest-neighbour estimator:
    ``psi(n) - psi(k) + log V_d + d mean_i log r_i``, with ``r_i`` the distance from ``x_i`` to
    its ``k``-th nearest neighbour and ``V_d`` the volume of the unit ball.

    A distribution with mass on a lower-dimensional set (actions clipped onto a face of the box)
    has no differential entropy: the estimate then falls without bound as ``num_samples`` grows.
    Samples that coincide exactly are refused.
    """
    if x.ndim != 2 or not 1 <= k < x.shape[0]:
        raise ValueError(f"samples of shape {tuple(x.shape)} with k={k}: expected [num_samples, dim] with 1 <= k < num_samples.")
    n, d = x.shape
    x = x.double()
    dist = torch.cdist(x, x)
    dist.fill_diagonal_(float("inf"))
    r = dist.topk(k, dim=-1, largest=False).values[:, -1]
    if not bool((r > 0).all()):
        raise ValueError(
            f"{int((r == 0).sum())} of {n} samples have {k} or more exact copies: the distribution has atoms and no "
            f"differential entropy (e.g. actions clipped onto the box's corners); pass samples of a continuous distribution."
        )
    log_unit_ball = d / 2 * math.log(math.pi) - math.lgamma(d / 2 + 1)
    return (torch.special.digamma(x.new_tensor(float(n))) - torch.special.digamma(x.new_tensor(float(k))) + log_unit_ball + d * r.log().mean()).float()
