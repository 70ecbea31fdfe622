"""Checkpoint files that are safe to load and survive a crash mid-write.

A checkpoint holds tensors and plain data only (dicts, lists, numbers, strings), so it is
read with ``torch.load(weights_only=True)``: a crafted file cannot run code. TensorDicts
and numpy arrays (the RNG states) are stored as tagged plain dicts and rebuilt on load.
Writes go to ``<file>.tmp``, are flushed to disk (``fsync``), then renamed over the old
file: a crash leaves either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase

_TENSORDICT = "__tensordict__"
_NDARRAY = "__ndarray__"


def to_plain(obj):
    """``obj`` with every TensorDict and numpy array replaced by a tagged dict of tensors."""
    if isinstance(obj, TensorDictBase):
        return {_TENSORDICT: True, "batch_size": list(obj.batch_size), "data": {k: to_plain(v) for k, v in obj.items()}}
    if isinstance(obj, np.ndarray):
        return {_NDARRAY: str(obj.dtype), "data": torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj.copy())}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    return obj


def from_plain(obj):
    """The inverse of :func:`to_plain`."""
    if isinstance(obj, dict):
        if obj.get(_TENSORDICT) is True:
            return TensorDict({k: from_plain(v) for k, v in obj["data"].items()}, batch_size=obj["batch_size"])
        if isinstance(obj.get(_NDARRAY), str):
            return obj["data"].numpy().astype(obj[_NDARRAY])
        return {k: from_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(from_plain(v) for v in obj)
    return obj


def rng_states() -> dict:
    """torch's, numpy's and Python's global RNG states, as plain data."""
    return {"torch": torch.get_rng_state(), "numpy": to_plain(np.random.get_state()), "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(tuple(from_plain(states["numpy"])))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` atomically and durably: a temporary file, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        torch.save(to_plain(state), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # the rename itself survives a power cut once the folder's entry is on disk
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_tmp(path: str | os.PathLike) -> bool:
    """Remove the ``.tmp`` a crash during :func:`save_checkpoint` left beside ``path``; True if one was."""
    tmp = tmp_path(Path(path))
    if tmp.exists():
        tmp.unlink()
        return True
    return False


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """Read a checkpoint with ``weights_only=True``; clear errors for unsafe, truncated or corrupt files."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"checkpoint {path} holds objects other than tensors and plain data ({first}). It was "
            f"not loaded: unpickling it could run code. Use a checkpoint written by torchrl_bdpo "
            f"(this version or later), or start a fresh run in a new directory."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(
            f"could not read checkpoint {path} ({type(err).__name__}: {str(err)[:200]}): the file is "
            f"truncated, empty or not a checkpoint. Delete it to start over, or restore a copy."
        ) from err
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint dict: delete it or restore a copy.")
    return from_plain(state)
