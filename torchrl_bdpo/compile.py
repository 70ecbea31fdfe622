"""Deprecated location: :mod:`torchrl_bdpo.speed` (``from torchrl_bdpo.speed import accelerate``)."""

from torchrl_bdpo.speed.compile import AcceleratedFunction, accelerate, input_signature

__all__ = ["AcceleratedFunction", "accelerate", "input_signature"]

import warnings as _warnings

_warnings.warn("torchrl_bdpo.compile moved to torchrl_bdpo.speed: import accelerate from torchrl_bdpo.speed.", DeprecationWarning, stacklevel=2)
