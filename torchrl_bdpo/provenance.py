"""What a result was made with: the versions of the packages that decide the numbers, and the CPU.

Simulation and training are deterministic for a given seed only on the same software and
hardware: MuJoCo releases and CPU instruction sets differ in the last bits of a float, and a
chaotic system (a walking robot, an RL run) grows those bits into different trajectories. The
generated datasets of docs/datasets.md changed this way between two machines
(docs/datasets.md, "Reproducibility"), so every summary records this.
"""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("torch", "torchrl", "tensordict", "numpy", "gymnasium", "mujoco", "minari")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def software_versions() -> dict:
    """``{package: version or None}`` for :data:`PACKAGES`, plus Python, the platform and the CPU."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out.update(python=platform.python_version(), platform=platform.platform(), cpu=cpu_model())
    return out


def machine() -> dict:
    """:func:`software_versions` and torch's thread count: the ``"machine"`` entry of a benchmark's JSON."""
    import torch

    return {**software_versions(), "threads": torch.get_num_threads()}


def run_record(args, *, leave_out: tuple[str, ...] = ("runs", "out"), **payload) -> dict:
    """A benchmark's JSON record: ``{"settings", "machine", **payload}``.

    ``settings`` is ``vars(args)`` (an ``argparse.Namespace``) without the ``leave_out`` entries
    (inputs and outputs that are not settings) and with paths as strings.
    """
    settings = {k: (str(v) if hasattr(v, "__fspath__") else v) for k, v in vars(args).items() if k not in leave_out}
    return {"settings": settings, "machine": machine(), **payload}
