"""Layers with faster compiled and CPU paths than their ATen kernels: the same values to float rounding.

:class:`Mish` and :class:`Linear` are the layers of :mod:`torchrl_bdpo.diffusion.networks`;
:func:`set_fuse_narrow_linear` is the (experimental) narrow-map setting of a network or a loss.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def mish_one_exp(x: torch.Tensor) -> torch.Tensor:
    """``mish(x) = x tanh(softplus(x))`` written with a single ``exp``.

    With ``n = e^x (e^x + 2)``, ``tanh(softplus(x)) = n / (n + 2)``. Clamping ``x`` at 20
    before the ``exp`` changes nothing in float32 (``n / (n + 2)`` is already 1 there) and
    keeps ``n`` finite. Elementwise-fused by a compiler this is ~6x faster on a CPU than
    ATen's ``mish`` (``tanh`` and ``log1p`` per element), whose inductor lowering is no faster.
    """
    e = torch.exp(x.clamp(max=20.0))
    n = e * (e + 2.0)
    return x * (n / (n + 2.0))


class Mish(nn.Mish):
    """``nn.Mish`` that traces as :func:`mish_one_exp` under ``torch.compile`` (inductor fuses it into
    one ``exp`` kernel, ~6x faster than ATen's ``mish`` on a CPU); eager calls run ATen's kernel.
    Both agree to float32 rounding."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return mish_one_exp(input)
        return super().forward(input)


# Where narrow_linear writes a map with few inputs or outputs as a sum under torch.compile:
# False (nowhere: always F.linear, a GEMM; the default), "cuda" (on CUDA tensors) or True (every
# device). The sums are experimental: they take GEMM calls out of a compiled step, but no GPU has
# timed them yet (benchmarks/gpu_check.sh does). Each network holds its own setting
# (`fuse_narrow`); set_fuse_narrow_linear changes it for every layer of a module.
NARROW_FEATURES = 8


def check_fuse_narrow(setting) -> None:
    """A ``ValueError`` naming ``setting`` unless it is ``False``, ``"cuda"`` or ``True``."""
    if not (setting is True or setting is False or setting == "cuda"):
        raise ValueError(f"fuse_narrow={setting!r}: expected False (the default: GEMMs), 'cuda' (sums on CUDA tensors) or True (sums on every device).")


def _fuse_narrow(x: torch.Tensor, setting) -> bool:
    check_fuse_narrow(setting)
    return setting is True or (setting == "cuda" and x.device.type == "cuda")


def _fusing_modules(module: nn.Module) -> list[nn.Module]:
    """Every module under ``module`` with a ``fuse_narrow`` setting, each once: its submodules, and
    the networks a TorchRL ``LossModule`` keeps outside them (``convert_to_functional`` stores
    each network in the instance dict and registers only its parameters)."""
    found, seen, stack = [], set(), [module]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if hasattr(type(m), "fuse_narrow"):
            found.append(m)
        stack.extend(reversed([*m.children(), *(v for v in vars(m).values() if isinstance(v, nn.Module))]))
    return found


def set_fuse_narrow_linear(module: nn.Module, setting: bool | str) -> nn.Module:
    """Set where every layer of ``module`` writes its narrow maps as sums (see :func:`narrow_linear`).

    ``module``: a network, or a loss (the networks of a TorchRL ``LossModule`` included).

    ``setting`` (checked first; a refused one changes nothing): ``False`` (the default of every
    network), ``"cuda"`` or ``True`` (experimental: 0.98x the GEMMs on an H200). It is read while
    ``torch.compile`` traces: set it before compiling (a compiled function already traced keeps
    the graphs it has). Returns ``module``.
    """
    check_fuse_narrow(setting)
    for m in _fusing_modules(module):
        m.fuse_narrow = setting
    return module


@contextlib.contextmanager
def fuse_narrow_linear(module: nn.Module, setting: bool | str):
    """:func:`set_fuse_narrow_linear` inside the block; each layer's own setting restored after."""
    check_fuse_narrow(setting)
    saved = [(m, m.fuse_narrow) for m in _fusing_modules(module)]
    set_fuse_narrow_linear(module, setting)
    try:
        yield module
    finally:
        for m, value in saved:
            m.fuse_narrow = value


def narrow_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, fuse: bool | str = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; under ``torch.compile``, a map with few inputs or outputs as a sum.

    With at most :data:`NARROW_FEATURES` input features (the action part of a first layer) the
    map is ``sum_i x_i W[:, i]``, which inductor unrolls into the pointwise kernel around it (the
    added time and observation rows, the Mish); with at most that many outputs (an eps head, a
    critic's 1-wide head) it is one dot product per output, a reduction that takes the previous
    layer's pointwise ops in. Either way the GEMM kernel of its own (on a GPU, a slow one: such
    dims keep cuBLAS off the TF32 tensor cores, FFMA and gemv kernels) and a pass over its output
    go. Wider maps stay one GEMM (``matmul`` and the bias, F.linear's terms). The same values up
    to float rounding (another summation order). Where: ``fuse``, ``False`` by default (never),
    ``"cuda"`` (on CUDA tensors: the case it is meant for; on a CPU the step's GEMMs are its
    cost, not their number) or ``True`` (every device); eager calls always take ``F.linear``.
    Experimental: it takes GEMM calls out of a compiled step, but no GPU has timed it yet.
    """
    out_features, in_features = weight.shape[-2:]
    if not (_fuse_narrow(x, fuse) and torch.compiler.is_compiling()):  # the setting checked in eager calls too
        return F.linear(x, weight, bias)
    if in_features <= NARROW_FEATURES and in_features <= out_features:
        y = (x.unsqueeze(-1) * weight.transpose(-1, -2)).sum(-2)
    elif out_features <= NARROW_FEATURES:
        y = (x.unsqueeze(-2) * weight).sum(-1)
    else:
        # F.linear's own terms: traced under vmap with dynamic shapes (compiled acting), F.linear
        # on the output of a sum above fails in torch 2.13 ("Cannot call sizes() on tensor with
        # symbolic sizes/strides", in its batching rule)
        y = torch.matmul(x, weight.transpose(-1, -2))
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) whose forward is :func:`narrow_linear`
    with this layer's ``fuse_narrow`` setting (``False``; see :func:`set_fuse_narrow_linear`)."""

    fuse_narrow: bool | str = False

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return narrow_linear(input, self.weight, self.bias, fuse=self.fuse_narrow)
