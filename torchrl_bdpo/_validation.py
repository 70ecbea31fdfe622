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
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}: expected a last dimension of {expected}. {fix}")


def check_num_steps(num_steps, *, what: str = "the number of diffusion steps", hint: str = "") -> int:
    """Return ``num_steps`` when it is an integer >= 1 (a bool is not), else raise a ValueError.

    The message names the value, ``what`` it should be, and ends with ``hint``.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r}: expected {what} (an integer N >= 1).{hint}")
    return num_steps


def params_dtype(params) -> torch.dtype:
    """The dtype the networks compute in: that of the first leaf of their parameters."""
    return next(iter(params.values(True, True))).dtype


def read_inputs(tensordict, keys, dtype: torch.dtype, *, owner: str, finite: bool = True) -> list[torch.Tensor]:
    """The entries ``keys`` of a loss's batch, checked; a clear error for each bad one.

    A batch without rows, a missing key, or a non-floating / other-precision entry (the
    networks compute in ``dtype``) raise an error that names the key, what it holds, what is
    expected and the fix; with ``finite``, NaN / inf too (:func:`check_finite`, skipped
    inside static graphs). Shapes and dtypes are static, so this costs no host sync.
    """
    if tensordict.batch_size.numel() == 0:
        raise ValueError(
            f"{owner} got an empty batch (batch size {tuple(tensordict.batch_size)}): its losses "
            f"would be NaN (a mean over no rows). Sample at least one transition."
        )
    values = []
    for key in keys:
        value = tensordict.get(key, None)
        if value is None:
            present = ", ".join(sorted(str(k) for k in tensordict.keys(True, True)))
            raise KeyError(
                f"{owner}: the batch has no {key!r} entry (it holds: {present}). Add it to the "
                f"data, or point the loss at the key that holds it with loss.set_keys(...)."
            )
        if value.dtype != dtype:
            raise TypeError(
                f"{owner}: tensordict[{key!r}] is {value.dtype} with shape {tuple(value.shape)}; "
                f"expected {dtype}, the networks' dtype. Cast it before the loss "
                f"(e.g. td[{key!r}] = td[{key!r}].to({dtype})), or the networks with .to({dtype})."
            )
        if finite:
            check_finite(f"tensordict[{key!r}]", value)
        values.append(value)
    return values


def read_flag(tensordict, key, *, owner: str) -> torch.Tensor:
    """A ``done`` / ``terminated`` / ``truncated`` entry as a bool tensor.

    ``~`` on an integer flag flips its bits (``~1 == -2``) and silently corrupts a TD target,
    so integer and float 0/1 flags are converted here; outside static graphs, a value other
    than 0 or 1 raises. ``None`` when the key is absent.
    """
    value = tensordict.get(key, None)
    if value is None or value.dtype == torch.bool:
        return value
    if not static_graph() and not bool(((value == 0) | (value == 1)).all()):
        bad = value[(value != 0) & (value != 1)].reshape(-1)[:3].tolist()
        raise ValueError(f"{owner}: tensordict[{key!r}] ({value.dtype}) holds {bad}: a flag must be bool or 0/1. Store it as a bool tensor.")
    return value != 0
