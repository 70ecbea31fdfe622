"""Import the scripts and benchmarks, which are files, not modules of the package."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_DIR = ROOT / "sota-implementations" / "bdpo"


def load_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_script(name: str):
    """``sota-implementations/bdpo/<name>.py`` (its folder on ``sys.path`` for its ``utils``)."""
    if str(SCRIPT_DIR) not in sys.path:
        sys.path.insert(0, str(SCRIPT_DIR))
    return load_file(SCRIPT_DIR / f"{name}.py", name)


def load_benchmark(name: str):
    """``benchmarks/<name>.py``."""
    return load_file(ROOT / "benchmarks" / f"{name}.py", name)


# the networks and phases of the tiny script runs (a few seconds each on a CPU)
TINY_MODEL = ["diffusion.hidden=16", "diffusion.depth=2", "critic.hidden=16", "critic.num_qvalue_nets=2", "loss.num_samples=2", "optim.batch_size=32"]
TINY_PHASES = ["optim.pretrain_steps=20", "optim.steps=30", "optim.warmup=5", "optim.actor_every=2"]


def compose_script_config(name: str, overrides: list[str]):
    """The hydra config ``name`` of the scripts' config folder, with ``overrides``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(SCRIPT_DIR / "config"), version_base="1.3"):
        return compose(name, overrides=overrides)


class Interrupt(Exception):
    """Raised by :func:`assert_resume_is_step_for_step`'s buffer: a crash mid-run."""


def assert_resume_is_step_for_step(script, buffer_factory: str, config, tmp_path, monkeypatch, *overrides):
    """Train ``script`` (20 phase-A + 30 phase-B steps, checkpoints every 10) once whole, once
    crashing during phase-B step 17 (the buffer named ``buffer_factory`` in the script raises
    on its 38th batch) and resumed: the resumed run redoes steps 10..29 from the checkpoint
    at 10, and every logged loss equals the whole run's. Returns both runs' summaries."""
    import pytest

    full_summary = script.train(config(tmp_path / "full", *overrides))
    full = full_summary["history"]
    real = getattr(script, buffer_factory)
    calls = {"n": 0}

    def interrupted_buffer(*args, **kwargs):
        buffer = real(*args, **kwargs)
        sample = buffer.sample

        def sample_then_die():
            calls["n"] += 1
            if calls["n"] > 20 + 17:  # 20 phase-A batches, then die during phase-B step 17
                raise Interrupt()
            return sample()

        buffer.sample = sample_then_die
        return buffer

    monkeypatch.setattr(script, buffer_factory, interrupted_buffer)
    with pytest.raises(Interrupt):
        script.train(config(tmp_path / "resumed", *overrides))
    monkeypatch.setattr(script, buffer_factory, real)
    resumed_summary = script.train(config(tmp_path / "resumed", *overrides, "checkpoint.resume=true"))
    resumed = resumed_summary["history"]
    assert len(resumed) == 20
    for a, b in zip(full[10:], resumed):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    return full_summary, resumed_summary
