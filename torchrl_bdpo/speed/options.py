"""The CPU speed strategies of the losses and the update, as one explicit options object."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

# "auto" ensemble chunks hold 6400 // K rows: one 256-wide layer of all K members is then
# 6400 x 256 float32 = 6.5 MB, inside a CPU's L3 (32, 64 and 128 states x M = 10 samples were
# tried at K = 10 on a 32 MiB L3: 64 was fastest)
AUTO_CHUNK_ELEMENTS = 6400


@dataclass(frozen=True)
class SpeedOptions:
    """How the losses and :class:`~torchrl_bdpo.training.BDPOUpdate` run on a CPU: the same numbers
    (up to float rounding), another schedule of the work. GPU tensors take none of these paths.

    Pass one to the loss (``BDPOLoss(..., speed=SpeedOptions(...))``); the update reads the loss's.
    Nothing here is a module global, and nothing changes the options after construction.

    Args:
        ensemble_chunk_rows (int, "auto" or None): evaluate a Q or V ensemble call over more rows
            than this (the ``B x M`` target samples) in chunks of at most this many rows, so that
            each chunk's activations stay in the cache (on a 2-core CPU: toy-preset phase-B steps
            ~1.3x compiled and ~2x eager, D4RL preset ~1.07x; docs/performance.md). ``"auto"``:
            ``6400 // K`` rows. ``None``: never split. Defaults to ``"auto"``.
        ensemble_chunk_compile (dict or None): ``torch.compile`` keyword arguments (``{}`` for its
            defaults) with which a compiled step runs the ensemble chunks: the chunk loop is then a
            graph break, and each chunk runs one compiled graph of the ensemble, outside the step's
            graph. ``None`` (the default): compiled steps evaluate each ensemble in one call, inside
            the step's graph. Eager steps chunk either way. Pass it when you compile the steps on a
            CPU (the scripts pass their ``compile`` settings).
        q_target_rows (bool): compiled CPU steps evaluate the target ``V_0 = Q`` of the V and actor
            objectives on about ``B / N`` selected rows instead of all ``B`` (toy-preset compiled
            phase B ~1.5x on a 2-core CPU): :func:`~torchrl_bdpo.speed.rows.next_value_q_rows`.
            Defaults to ``True``.
        behavior_program (bool): compiled CPU behavior steps (phase A) run the denoising loss, its
            gradients and the clip as one compiled function of the parameters
            (:class:`~torchrl_bdpo.speed.behavior.BehaviorProgram`; 1.14-1.16x the pretraining
            steps/s on a 2-core CPU). Defaults to ``True``.
    """

    ensemble_chunk_rows: int | str | None = "auto"
    ensemble_chunk_compile: Mapping | None = field(default=None, hash=False)
    q_target_rows: bool = True
    behavior_program: bool = True

    def __post_init__(self) -> None:
        rows = self.ensemble_chunk_rows
        if not (rows is None or rows == "auto" or (isinstance(rows, int) and not isinstance(rows, bool) and rows >= 1)):
            raise ValueError(
                f"ensemble_chunk_rows={rows!r}: expected an integer >= 1 (the most rows an ensemble call "
                f'evaluates at once on a CPU), "auto" (6400 // K rows) or None (never split).'
            )
        compile_options = self.ensemble_chunk_compile
        if not (compile_options is None or isinstance(compile_options, Mapping)):
            raise TypeError(f"ensemble_chunk_compile={compile_options!r}: expected None or a dict of torch.compile keyword arguments ({{}} for its defaults).")
        if compile_options is not None:
            object.__setattr__(self, "ensemble_chunk_compile", dict(compile_options))
        for name in ("q_target_rows", "behavior_program"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r}: expected True or False.")

    def chunk_rows(self, ensemble_size: int) -> int | None:
        """The row limit of one ensemble call of ``ensemble_size`` members (``None``: no split)."""
        if self.ensemble_chunk_rows == "auto":
            return max(1, AUTO_CHUNK_ELEMENTS // ensemble_size)
        return self.ensemble_chunk_rows
