"""Input checks shared by the modules and losses.

Checks that read tensor values (finiteness) synchronise with the device, so
they are skipped while ``torch.compile`` traces or a CUDA graph is captured,
and can be switched off with the ``validate`` flag of each module once a
pipeline is known to be clean.
"""
from __future__ import annotations

import torch


def static_graph() -> bool:
    """True while ``torch.compile`` traces or a CUDA graph is being captured.

    Code paths with data-dependent shapes (``nonzero``) or host syncs (``.item()``)
    must take their static alternative then.
    """
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise a ``ValueError`` naming ``name`` when ``tensor`` holds NaN or inf."""
    if not torch.is_floating_point(tensor) or static_graph():
        return
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = (~finite).sum().item()
        raise ValueError(
            f"{name} holds {bad} non-finite value(s) (NaN or inf) out of "
            f"{tensor.numel()}; expected finite numbers. Clean or filter the data "
            f"before it reaches the module (e.g. drop the transitions with "
            f"torch.isfinite), or fix the upstream computation that produced them."
        )


def check_last_dim(name: str, tensor: torch.Tensor, expected: int, fix: str) -> None:
    """Raise a ``ValueError`` when the feature dimension of ``tensor`` is not ``expected``."""
    if tensor.ndim == 0 or tensor.shape[-1] != expected:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)}: expected a last dimension of "
            f"{expected}. {fix}"
        )


def check_num_steps(num_steps, *, what: str = "the number of diffusion steps", hint: str = "") -> int:
    """Return ``num_steps`` when it is an integer >= 1 (a bool is not), else raise a ValueError.

    The message names the value, ``what`` it should be, and ends with ``hint``.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r}: expected {what} (an integer N >= 1).{hint}")
    return num_steps
