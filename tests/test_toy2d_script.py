"""Smoke, resume and bad-input tests of sota-implementations/bdpo/bdpo_toy2d.py at tiny budgets."""

import json
import sys

import pytest
import torch

from torchrl_bdpo.checkpoint import load_checkpoint, save_checkpoint
from hydra import compose, initialize_config_dir

from tests.helpers import make_loss_nan
from tests.loaders import SCRIPT_DIR, TINY_MODEL, TINY_PHASES, assert_resume_is_step_for_step, load_script

pytestmark = pytest.mark.filterwarnings("ignore")

toy = load_script("bdpo_toy2d")

TINY = ["env.num_points=2000", "diffusion.num_steps=5", *TINY_MODEL, *TINY_PHASES, "eval.num_samples=200", "logger.log_interval=5", "checkpoint.interval=10"]


def config(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(SCRIPT_DIR / "config"), version_base="1.3"):
        return compose("toy2d", overrides=[*TINY, f"output_dir={tmp_path}", *overrides])


def test_smoke_outputs(tmp_path):
    summary = toy.train(config(tmp_path))
    for name in ("summary.json", "targets.png", "actor_samples.png", "values.png", "checkpoint.pt", "config.yaml"):
        assert (tmp_path / name).stat().st_size > 0, name
    written = json.loads((tmp_path / "summary.json").read_text())
    assert set(written["metrics"]) >= {"sw_actor_pstar", "sw_behavior_pstar", "reward_actor", "reward_pstar", "mmd2_behavior_data", "mmd2_data_data"}
    assert all(torch.isfinite(torch.tensor(v)) for v in written["metrics"].values())
    # a behavior model trained for a few steps is far from the data, two data draws are not
    m = written["metrics"]
    assert m["mmd2_behavior_data"] > 20 * abs(m["mmd2_data_data"]), m
    csvs = list((tmp_path / "logs").rglob("*.csv"))
    assert any(p.name == "loss_value.csv" for p in csvs) and any(p.name == "loss_actor.csv" for p in csvs)
    assert len(summary["history"]) == 30


@pytest.mark.gpu
def test_cuda_run_evaluates_and_plots(tmp_path):
    """``device=cuda`` with graphed steps (each step's two losses on two CUDA streams): training,
    the metrics against pi* and the figures (computed from the GPU networks' samples and values,
    on the CPU)."""
    summary = toy.train(config(tmp_path, "device=cuda", "compile.cudagraphs=true", "compile.overlap_losses=true"))
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["metrics"].values())
    for name in ("targets.png", "actor_samples.png", "values.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert len(summary["history"]) == 30


def test_resume_gives_the_same_losses_step_for_step(tmp_path, monkeypatch):
    assert_resume_is_step_for_step(toy, "make_toy_buffer", config, tmp_path, monkeypatch)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"env.dataset='8gausians'.*8gaussians"):
        toy.train(config(tmp_path / "a", "env.dataset=8gausians"))
    toy.train(config(tmp_path / "b", "optim.steps=10"))
    with pytest.raises(ValueError, match=r"another config; differing keys: \['loss.eta \(0.06 in the checkpoint, 0.5 now\)'\]"):
        toy.train(config(tmp_path / "b", "optim.steps=10", "loss.eta=0.5", "checkpoint.resume=true"))
    with pytest.raises(ValueError, match=r"optim.batch_size=0: expected >= 1"):  # was a NaN loss
        toy.train(config(tmp_path / "z", "optim.batch_size=0"))
    with pytest.raises(ValueError, match=r"matmul_precision='fp16': expected one of \('highest', 'high', 'medium'\)"):
        toy.train(config(tmp_path / "c", "matmul_precision=fp16"))
    with pytest.raises(ValueError, match=r"overlap_losses=True runs the losses on two CUDA streams, but the loss's parameters are on \['cpu'\]"):
        toy.train(config(tmp_path / "d", "compile.overlap_losses=true"))


def test_overlap_losses_default_follows_cudagraphs(tmp_path, monkeypatch):
    """compile.overlap_losses: null gives two streams exactly when the steps are CUDA graphs."""
    import utils

    asked = []
    monkeypatch.setattr(utils, "BDPOUpdate", lambda *a, **kw: asked.append(kw))
    for overrides, expected in [
        ((), (False, False)),
        (("compile.cudagraphs=true",), (True, True)),
        (("compile.cudagraphs=true", "compile.overlap_losses=false"), (True, False)),
        (("compile.overlap_losses=true",), (False, True)),
    ]:
        utils.make_update(config(tmp_path, *overrides), torch.nn.Module(), {}, {})  # a stand-in loss
        assert (asked[-1]["cudagraphs"], asked[-1]["overlap_losses"]) == expected, overrides
    with pytest.raises(ValueError, match=r"compile.overlap_losses='yes': expected true, false or null"):
        utils.make_update(config(tmp_path, "compile.overlap_losses=yes"), torch.nn.Module(), {}, {})


def test_fuse_narrow_linear_setting_reaches_the_networks(tmp_path, monkeypatch):
    """compile.fuse_narrow_linear is set on every network of the loss (false by default), before the
    update is built; another value is refused and changes nothing."""
    import utils
    from torchrl_bdpo.diffusion import networks
    from torchrl_bdpo.speed import kernels

    cfg = config(tmp_path)
    loss = utils.make_bdpo_loss(cfg, observation_dim=1, action_dim=2)
    fusing = kernels._fusing_modules(loss)
    # the actor's and the behavior's eps networks, the V and Q networks, and each one's Linear layers
    assert sorted(type(m).__name__ for m in fusing if type(m) is not networks.Linear) == [
        "DiffusionValueNetwork",
        "EpsilonNetwork",
        "EpsilonNetwork",
        "QValueNetwork",
    ]
    assert sum(type(m) is networks.Linear for m in fusing) == 2 * (cfg.diffusion.depth + 1) + 2 * (cfg.critic.depth + 1)
    seen = []
    monkeypatch.setattr(utils, "BDPOUpdate", lambda loss, *a, **kw: seen.append({m.fuse_narrow for m in fusing}))
    for overrides, expected in [
        ((), False),
        (("compile.fuse_narrow_linear=true",), True),
        (("compile.fuse_narrow_linear=false",), False),
        (("compile.fuse_narrow_linear=cuda",), "cuda"),
    ]:
        utils.make_update(config(tmp_path, *overrides), loss, {}, {})
        assert seen[-1] == {expected} and {type(m.fuse_narrow) for m in fusing} == {type(expected)}, overrides
    with pytest.raises(ValueError, match=r"compile.fuse_narrow_linear='gpu': expected false \(the default"):
        utils.make_update(config(tmp_path, "compile.fuse_narrow_linear=gpu"), loss, {}, {})
    with pytest.raises(ValueError, match=r"compile.fuse_narrow_linear=1: expected"):
        utils.make_update(config(tmp_path, "compile.fuse_narrow_linear=1"), loss, {}, {})
    assert {m.fuse_narrow for m in fusing} == {"cuda"}  # a refused value changes nothing
    assert networks.narrow_linear.__kwdefaults__ == {"fuse": False}  # no process-wide setting moved


def test_compiled_cpu_steps_give_the_loss_its_chunk_compile_options(tmp_path):
    """The scripts build the loss with the ensemble chunks' compile options: the steps' mode when
    compiled without CUDA graphs, none otherwise (eager chunks, or no chunks inside graphs)."""
    import utils

    for overrides, expected in [
        ((), None),
        (("compile.compile=true",), {}),
        (("compile.compile=true", "compile.mode=max-autotune-no-cudagraphs"), {"mode": "max-autotune-no-cudagraphs"}),
        (("compile.compile=true", "compile.cudagraphs=true"), None),
    ]:
        cfg = config(tmp_path, *overrides)
        assert utils.chunk_compile_options(cfg) == expected, overrides
        if not cfg.compile.get("cudagraphs", False):  # a CPU run can build it
            assert utils.make_bdpo_loss(cfg, observation_dim=1, action_dim=2).speed.ensemble_chunk_compile == expected


def test_matmul_precision_is_applied_and_part_of_the_checkpoint_config(tmp_path):
    toy.train(config(tmp_path, "optim.steps=10"))
    path = tmp_path / "checkpoint.pt"
    # a checkpoint written before the key existed: its run used torch's default, "highest"
    state = load_checkpoint(path)
    assert state["config"].pop("matmul_precision") == "highest"
    save_checkpoint(path, state)
    resume = ("optim.steps=10", "checkpoint.resume=true")
    try:
        with pytest.raises(ValueError, match=r"differing keys: \[\"matmul_precision \('highest' in the checkpoint, 'high' now\)\"\]"):
            toy.train(config(tmp_path, *resume, "matmul_precision=high"))
        assert torch.get_float32_matmul_precision() == "high"  # set before the checkpoint is read
    finally:
        torch.set_float32_matmul_precision("highest")
    summary = toy.train(config(tmp_path, *resume))  # the default matches the old checkpoint
    assert summary["history"] == []  # it had finished: nothing left to run


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    make_loss_nan(monkeypatch, "actor_loss")
    # the hand-over's checkpoint is checked first (its actor loss is NaN): phase A's last one stays
    with pytest.raises(FloatingPointError, match=r"state after train step 0 holds non-finite losses \{'actor_loss': nan\}.*not written.*checkpoint.pt"):
        toy.train(config(tmp_path))
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["phase"] == "pretrain" and state["step"] == 20
    import utils  # the scripts' shared loop (run_phases) lives there

    monkeypatch.setattr(utils, "check_state_before_saving", lambda *args: None)
    with pytest.raises(FloatingPointError, match=r"loss_actor became nan at step 5.*checkpoint.pt"):
        toy.train(config(tmp_path / "b"))
    state = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert state["phase"] == "train" and state["step"] == 0


def test_true_reward_q_is_the_energy_and_trains_the_rest(tmp_path):
    """``critic.true_reward=true``: Q is the dataset's energy (no Q parameters), V and the actor train."""
    cfg = config(tmp_path, "env.dataset=checkerboard", "critic.true_reward=true")
    q = toy.true_reward_q(cfg)
    points = torch.tensor([[1.0, 0.5], [-1.0, 0.5], [-3.0, -3.0], [3.0, 1.0]])
    torch.testing.assert_close(q.module(torch.zeros(4, 1), points).squeeze(-1), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    summary = toy.train(cfg)
    assert len(summary["history"]) == 30
    assert all(torch.isfinite(torch.tensor(h["loss_value"])) for h in summary["history"])
    assert any("loss_actor" in h for h in summary["history"])
    assert (tmp_path / "values.png").stat().st_size > 0


@pytest.mark.gpu
def test_true_reward_q_on_cuda_with_graphed_steps(tmp_path):
    """The energy as Q inside captured steps on a GPU: 8gaussians' centres are on the device
    before the capture (compiled, they are a constant of the graph: tests/test_toy_data.py)."""
    cfg = config(tmp_path, "env.dataset=8gaussians", "critic.true_reward=true", "device=cuda", "compile.cudagraphs=true")
    summary = toy.train(cfg)
    assert len(summary["history"]) == 30
    assert all(torch.isfinite(torch.tensor(h["loss_value"])) for h in summary["history"])
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["metrics"].values())


def test_true_reward_q_without_a_point_energy_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"critic.true_reward=true: dataset='moons'.*critic.true_reward=false"):
        toy.train(config(tmp_path, "env.dataset=moons", "critic.true_reward=true"))


def test_step_sampling_reaches_the_loss_and_older_checkpoints_resume(tmp_path):
    """``loss.step_sampling`` builds the loss with it; a checkpoint written before the key existed
    (its run drew i.i.d. steps) resumes under the default and is refused under another value."""
    summary = toy.train(config(tmp_path / "s", "optim.steps=10", "loss.step_sampling=stratified"))
    assert len(summary["history"]) == 10 and all(torch.isfinite(torch.tensor(h["loss_value"])) for h in summary["history"])
    import utils

    loss = utils.make_bdpo_loss(config(tmp_path / "s", "loss.step_sampling=stratified"), observation_dim=1, action_dim=2)
    assert loss.step_sampling == "stratified"
    toy.train(config(tmp_path, "optim.steps=10"))
    path = tmp_path / "checkpoint.pt"
    state = load_checkpoint(path)
    assert state["config"]["loss"].pop("step_sampling") == "uniform"
    save_checkpoint(path, state)
    resume = ("optim.steps=10", "checkpoint.resume=true")
    with pytest.raises(ValueError, match=r"loss.step_sampling \('uniform' in the checkpoint, 'stratified' now\)"):
        toy.train(config(tmp_path, *resume, "loss.step_sampling=stratified"))
    assert toy.train(config(tmp_path, *resume))["history"] == []
    with pytest.raises(ValueError, match=r"step_sampling='balanced': expected one of \('uniform', 'stratified'\)"):
        toy.train(config(tmp_path / "b", "loss.step_sampling=balanced"))


def test_train_scalars_entries():
    """The phase-B log row: losses, the critic diagnostics present, the paths' per-step KL only
    where next states have paths (the toy bandits' are all terminal), and the rate."""
    import utils
    from tensordict import TensorDict

    critic = TensorDict(
        {
            "qvalue_pred": torch.tensor(1.5),
            "qvalue_target": torch.tensor(2.0),
            "qvalue_target_rho": torch.tensor(0.75),
            "path_kl": torch.tensor(0.25),
            "value_pred": torch.tensor(3.0),
            "grad_norm_qvalue": torch.tensor(4.0),
            "grad_norm_value": torch.tensor(5.0),
            "kl_per_step": torch.tensor([0.5, 0.75]),
            "loss_qvalue": torch.tensor(9.0),
        }
    )
    row = {"loss_qvalue": 9.0, "loss_value": 8.0}
    offline = utils.train_scalars(row, critic, 12.5)
    assert offline == {
        "train/loss_qvalue": 9.0,
        "train/loss_value": 8.0,
        "train/qvalue_pred": 1.5,
        "train/qvalue_target": 2.0,
        "train/qvalue_target_rho": 0.75,
        "train/path_kl": 0.25,
        "train/value_pred": 3.0,
        "train/grad_norm_qvalue": 4.0,
        "train/grad_norm_value": 5.0,
        "train/kl_step_1": 0.5,
        "train/kl_step_2": 0.75,
        "train/steps_per_s": 12.5,
    }
    toy_row = utils.train_scalars(row, critic, 12.5, next_state_paths=False)
    paths = ("train/qvalue_target", "train/qvalue_target_rho", "train/path_kl", "train/kl_step_1", "train/kl_step_2")
    assert toy_row == {k: v for k, v in offline.items() if k not in paths}


def test_a_refused_resume_leaves_the_runs_records_as_they_were(tmp_path):
    """Through hydra itself: the second launch's .hydra record goes to its own folder, and its
    refused checkpoint leaves config.yaml untouched."""
    import os
    import subprocess

    script = str(SCRIPT_DIR / "bdpo_toy2d.py")
    tiny = ["optim.pretrain_steps=5", "optim.steps=5", "optim.warmup=1", "env.num_points=2000", "eval.num_samples=100", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, script, *tiny], check=True, capture_output=True, env=env)
    first = {p: p.read_text() for p in tmp_path.rglob("*.yaml")}
    assert len([p for p in first if ".hydra" in p.parts]) == 3 and (tmp_path / "config.yaml") in first
    out = subprocess.run([sys.executable, script, *tiny, "loss.eta=0.5", "checkpoint.resume=true"], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "differing keys: ['loss.eta (0.06 in the checkpoint, 0.5 now)']" in out.stderr
    for path, text in first.items():
        assert path.read_text() == text, path
    assert len(list((tmp_path / ".hydra").iterdir())) == 2  # the refused launch's own record
