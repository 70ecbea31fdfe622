"""Sweeps through hydra's launchers (joblib, submitit's local executor) and report.py over them."""

import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.loaders import SCRIPT_DIR, load_script

pytestmark = pytest.mark.filterwarnings("ignore")
pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install 'torchrl_bdpo[sweep]'")
pytest.importorskip("rliable", reason="pip install 'torchrl_bdpo[sweep]'")

report = load_script("report")
import utils  # noqa: E402

TINY = [
    "env.num_points=2000",
    "diffusion.num_steps=5",
    "diffusion.hidden=16",
    "diffusion.depth=2",
    "critic.hidden=16",
    "critic.num_qvalue_nets=2",
    "loss.num_samples=2",
    "optim.batch_size=32",
    "optim.pretrain_steps=20",
    "optim.steps=30",
    "optim.warmup=5",
    "optim.actor_every=2",
    "eval.num_samples=200",
    "logger.log_interval=5",
    "checkpoint.interval=10",
]


def toy_multirun(sweep_dir, *overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(SCRIPT_DIR / "bdpo_toy2d.py"), "-m", f"hydra.sweep.dir={sweep_dir}", *TINY, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_joblib_sweep_survives_a_failed_job_resumes_and_reports(tmp_path):
    sweep = tmp_path / "sweep"
    grid = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "env.dataset=moons,8gaussians,bogus", "seed=0,1"]
    out = toy_multirun(sweep, *grid)
    assert out.returncode != 0 and "env.dataset='bogus'" in out.stderr  # hydra reports the failed jobs at the end
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 4  # the four good jobs finished anyway
    # each of the two parallel jobs took its share of the cores
    assert {json.loads(p.read_text())["threads"] for p in summaries} == {max(1, (os.cpu_count() or 1) // 2)}

    result = report.main([str(sweep), "--reps", "200"])
    rows = {r["task"]: r for r in result["rows"]}
    assert rows["moons"]["seeds"] == 2 and rows["8gaussians"]["seeds"] == 2
    assert rows["bogus"]["seeds"] == 0 and rows["bogus"]["flagged"] == "seed 0 failed; seed 1 failed"
    for task in ("moons", "8gaussians"):
        scores = [r["score"] for r in result["runs"] if r["task"] == task]
        assert rows[task]["mean"] == pytest.approx(sum(scores) / 2)
    agg = result["aggregate"]
    for stat in ("iqm", "mean", "median"):
        low, high = agg[stat]["ci95"]
        assert low <= agg[stat]["point"] <= high
    assert agg["seeds_per_task_used"] == 2 and agg["tasks"] == ["8gaussians", "moons"]
    for name in ("table.md", "table.csv", "aggregate.json", "performance_profile.png"):
        assert (sweep / "report" / name).exists(), name
    assert "| bogus | — | 0 | seed 0 failed; seed 1 failed |" in (sweep / "report" / "table.md").read_text()

    # the same sweep again with checkpoint.resume=true: finished jobs are skipped, not retrained
    before = {p: p.read_text() for p in summaries}
    again = toy_multirun(sweep, *grid, "checkpoint.resume=true")
    assert again.stdout.count("finished already") == 4
    assert {p: p.read_text() for p in summaries} == before


def test_submitit_local_launcher_runs_a_job(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'torchrl_bdpo[sweep]'")
    out = toy_multirun(tmp_path, "hydra/launcher=submitit_local", "env.dataset=moons", "seed=0")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "0" / "summary.json").read_text())["metrics"]["reward_pstar"] > 0.9


def test_report_refuses_empty_sweeps_and_mixed_cells(tmp_path):
    with pytest.raises(ValueError, match="no runs in"):
        report.main([str(tmp_path)])
    for k, eta in enumerate((0.06, 0.5)):
        job = tmp_path / str(k)
        job.mkdir()
        OmegaConf.save(OmegaConf.create({"env": {"dataset": "moons", "num_points": 10}, "seed": k, "loss": {"eta": eta}}), job / "config.yaml")
    with pytest.raises(ValueError, match=r"task 'moons' mixes runs of different configs: .*0 and .*1 differ in \['loss.eta"):
        report.main([str(tmp_path)])


def test_a_missing_launcher_plugin_names_its_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "launcher" in name else real(name, *a))
    with pytest.raises(SystemExit, match="pip install hydra-joblib-launcher"):
        utils.check_launcher_plugin(["-m", "hydra/launcher=joblib"])
    utils.check_launcher_plugin(["env.dataset=moons"])  # no launcher named: nothing to check
