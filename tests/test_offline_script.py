"""Smoke, resume and bad-input tests of sota-implementations/bdpo/bdpo_offline.py on a tiny generated dataset."""

import json
import re
from importlib import metadata

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.helpers import make_loss_nan
from tests.loaders import SCRIPT_DIR, TINY_MODEL, TINY_PHASES, assert_resume_is_step_for_step, load_script

pytestmark = pytest.mark.filterwarnings("ignore")

off = load_script("bdpo_offline")
import utils  # noqa: E402  (the scripts' shared helpers and loop, importable once load_script ran)

# compile.compile=false: the cpu budget compiles; tests/test_accelerate.py covers that path
TINY = [
    "task=generated-hopper-random",
    "budget=cpu",
    *TINY_MODEL,
    *TINY_PHASES,
    *"""
    eval.interval=15 eval.pretrain_interval=10 eval.episodes=2 eval.max_steps=20 eval.num_candidates=3
    logger.log_interval=5 checkpoint.interval=10 compile.compile=false
    """.split(),
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A 300-transition random-policy Hopper-v5 dataset, made by the generator."""
    import os

    from torchrl_bdpo.data.generate import GenerateConfig, generate

    root = tmp_path_factory.mktemp("minari")
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    generate(GenerateConfig(levels=("random",), num_transitions=300, out_dir=str(root / "gen"), random_return_episodes=3, progress=False))
    yield root
    if old is None:
        os.environ.pop("MINARI_DATASETS_PATH")
    else:
        os.environ["MINARI_DATASETS_PATH"] = old


def config(tmp_path, *overrides, env_id="Hopper-v5"):
    """TINY with ``overrides``, its ``per_env`` values set for ``env_id`` (the dataset's: train
    sets them so itself, test_budget_per_env_values_follow_the_datasets_env)."""
    with initialize_config_dir(config_dir=str(SCRIPT_DIR / "config"), version_base="1.3"):
        cfg = compose("offline", overrides=[*TINY, f"output_dir={tmp_path}", *overrides])
    utils.resolve_per_env(cfg, env_id)
    return cfg


@pytest.mark.parametrize("override, rows", [(None, 6400 // 2), ("loss.ensemble_chunk_rows=8", 8), ("loss.ensemble_chunk_rows=null", None)])
def test_ensemble_chunk_rows_reach_the_loss(tmp_path, override, rows):
    """``loss.ensemble_chunk_rows`` (auto: 6400 // K rows, with K = 2 here) is the loss's."""
    cfg = config(tmp_path, *([override] if override else []))
    assert off.make_bdpo_loss(cfg, 11, 3).speed.chunk_rows(2) == rows


@pytest.mark.parametrize("override, rho, expected", [(None, 1.0, 1.0), ("loss.qvalue_target_rho=0.0", 1.0, 0.0), ("loss.qvalue_target_rho=0.5", 2.0, 0.5)])
def test_qvalue_target_rho_reaches_the_loss(tmp_path, override, rho, expected):
    """``loss.qvalue_target_rho`` (null: ``loss.rho``) is the loss's Q-target LCB weight; ``loss.rho``
    stays the V and actor one. A checkpoint written before the key existed matches ``null``."""
    cfg = config(tmp_path, f"loss.rho={rho}", *([override] if override else []))
    loss = off.make_bdpo_loss(cfg, 11, 3)
    assert (loss.rho, loss.qvalue_target_rho) == (rho, expected)
    if override is None:
        old = utils.config_fingerprint(cfg)
        del old["loss"]["qvalue_target_rho"], old["loss"]["qvalue_target_pessimism"]
        assert utils._prune(utils._with_later_keys(old)) == utils.config_fingerprint(cfg)


def test_qvalue_target_pessimism_reaches_the_loss(tmp_path):
    """``loss.qvalue_target_pessimism`` (null: a fixed weight) is the loss's share; with a fixed
    ``loss.qvalue_target_rho`` too, or out of [0, 1), it is refused by name before anything runs."""
    assert off.make_bdpo_loss(config(tmp_path), 11, 3).qvalue_target_pessimism is None
    assert off.make_bdpo_loss(config(tmp_path, "loss.qvalue_target_pessimism=0.5"), 11, 3).qvalue_target_pessimism == 0.5
    both = r"loss.qvalue_target_pessimism=0.5 and loss.qvalue_target_rho=1.0 both set the Q target's LCB weight: choose one"
    with pytest.raises(ValueError, match=both):
        off.train(config(tmp_path / "a", "loss.qvalue_target_pessimism=0.5", "loss.qvalue_target_rho=1.0"))
    with pytest.raises(ValueError, match=r"loss.qvalue_target_pessimism=1.5: expected a number in \[0, 1\)"):
        off.train(config(tmp_path / "b", "loss.qvalue_target_pessimism=1.5"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_smoke_outputs(tmp_path, dataset, monkeypatch):
    stats_of = []  # what each evaluation's episodes were, as episode_stats received them
    episode_stats = off.episode_stats

    def recording_stats(episodes, gamma):
        stats_of.append(([ep["next", "reward"].reshape(-1).tolist() for ep in episodes], gamma))
        return episode_stats(episodes, gamma)

    monkeypatch.setattr(off, "episode_stats", recording_stats)
    summary = off.train(config(tmp_path, "eval.num_envs=2"))  # a ParallelEnv of 2 workers
    for name in ("summary.json", "eval_returns.png", "checkpoint.pt", "config.yaml"):
        assert (tmp_path / name).stat().st_size > 0, name
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["software"]["torch"] == metadata.version("torch") and written["software"]["mujoco"] == metadata.version("mujoco")
    phases = [r["phase"] for r in written["evaluations"]]
    assert phases == ["pretrain", "pretrain", "train", "train"]  # phase A at 10, 20; phase B at 15, 30
    final = written["final"]
    assert final["step"] == 30 and "score_mean" in final and written["best"] is not None
    # Q diagnostic: finite Q on dataset pairs next to their (positive, Hopper) MC returns
    assert np.isfinite(final["q_dataset"]) and final["mc_return_dataset"] > 0
    # diagnostics that separate the causes of a drop, at every phase-B evaluation
    for key in (
        "return_one_sample_mean",
        "return_behavior_mean",
        "return_behavior_best_of_k_mean",
        "q_policy",
        "mc_return_policy",
        "mc_soft_return_policy",
        "path_kl_mean",
        "path_kl_p90",
    ):
        assert np.isfinite(final[key]), key
    assert final["path_kl_mean"] >= 0 and final["path_kl_p90"] >= 0
    # episode lengths and discounted returns of the four policies, each from its own episodes (the
    # last evaluation's calls: best-of-K, one sample, behavior, behavior best-of-K), recomputed here
    gamma, episodes = written["config"]["loss"]["gamma"], written["config"]["eval"]["episodes"]
    assert len(stats_of) == 2 * 4  # two phase-B evaluations, four policies each (phase A logs none)
    for name, (rewards, used_gamma) in zip(("", "_one_sample", "_behavior", "_behavior_best_of_k"), stats_of[-4:]):
        assert used_gamma == gamma and len(rewards) == episodes, name
        assert final[f"length{name}_mean"] == np.mean([len(r) for r in rewards]), name
        discounted = np.mean([sum(x * gamma**t for t, x in enumerate(r)) for r in rewards])
        assert final[f"discounted_return{name}_mean"] == pytest.approx(discounted, rel=1e-6), name
    assert written["dataset"]["num_transitions"] == 300 and written["dataset"]["env_id"] == "Hopper-v5"
    csvs = {p.name for p in (tmp_path / "logs").rglob("*.csv")}
    assert {
        "loss_qvalue.csv",
        "loss_actor.csv",
        "path_kl.csv",
        "kl_step_1.csv",
        "return_mean.csv",
        "q_dataset.csv",
        "return_one_sample_mean.csv",
        "return_behavior_mean.csv",
        "q_policy.csv",
        "path_kl_mean.csv",
    } <= csvs
    assert len(summary["history"]) == 30


@pytest.mark.gpu
@pytest.mark.parametrize("num_envs", [1, 2])
def test_cuda_run_evaluates_with_the_policy_on_the_gpu(tmp_path, dataset, num_envs):
    """``device=cuda``: the Gymnasium envs step on the CPU and their observations reach the
    policy on the GPU (a GymEnv, or a ParallelEnv of 2); graphed steps, TF32 matmuls."""
    overrides = ("device=cuda", f"eval.num_envs={num_envs}", "compile.cudagraphs=true", "matmul_precision=high")
    try:
        summary = off.train(config(tmp_path, *overrides))
    finally:
        torch.set_float32_matmul_precision("highest")
    written = json.loads((tmp_path / "summary.json").read_text())
    assert [r["phase"] for r in written["evaluations"]] == ["pretrain", "pretrain", "train", "train"]
    assert np.isfinite(written["final"]["return_mean"]) and np.isfinite(written["final"]["q_dataset"])
    assert len(summary["history"]) == 30


def test_eval_env_outputs_on_the_run_device(dataset):
    for num_envs in (1, 2):
        env = off.make_eval_env("Hopper-v5", num_envs, seed=0, device=torch.device("cpu"))
        try:
            td = env.rollout(2)
            assert env.device == torch.device("cpu") and td["next", "observation"].device == torch.device("cpu")
            assert td.batch_size == ((num_envs, 2) if num_envs > 1 else (2,))
        finally:
            env.close()


def test_resume_gives_the_same_losses_and_evaluations(tmp_path, dataset, monkeypatch):
    """Losses step for step, and every evaluation (phase A at 10 and 20, phase B at 15 and 30;
    the policy, one sample, the behavior and its best of K) to the episode: the resumed process
    evaluates at 15 first, the whole one after two phase-A evaluations, from the same states."""
    full, resumed = assert_resume_is_step_for_step(off, "make_offline_buffer", config, tmp_path, monkeypatch)
    assert [(r["phase"], r["step"]) for r in resumed["evaluations"]] == [("pretrain", 10), ("pretrain", 20), ("train", 15), ("train", 30)]
    assert len(full["evaluations"]) == 4
    for a, b in zip(full["evaluations"], resumed["evaluations"]):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == (b[key] if isinstance(a[key], str) or a[key] is None else pytest.approx(b[key], rel=1e-5, abs=1e-6)), (a["phase"], a["step"], key)


def test_evaluations_start_from_the_same_states(dataset):
    """``evaluate(..., seed=s)`` reseeds the env: two calls draw the same initial states (and a
    fixed policy gets the same returns); without ``seed`` the second call continues the stream."""
    from tensordict.nn import TensorDictModule
    from torchrl.envs.utils import ExplorationType

    from torchrl_bdpo.envs import evaluate

    still = TensorDictModule(lambda obs: torch.zeros(*obs.shape[:-1], 3), in_keys=["observation"], out_keys=["action"])
    env = off.make_eval_env("Hopper-v5", 2, seed=7, device=torch.device("cpu"))
    try:
        runs = [evaluate(env, still, 4, 30, ExplorationType.DETERMINISTIC, keep_episodes=True, seed=s) for s in (7, 7, None, 8)]
    finally:
        env.close()
    first = [torch.stack([ep["observation"][0] for ep in eps]) for _, eps in runs]
    assert first[0].shape == (4, 11) and torch.equal(first[0], first[1])
    assert runs[0][0].tolist() == runs[1][0].tolist()
    assert not torch.allclose(first[1], first[2]) and not torch.allclose(first[0], first[3])


def test_bad_input(tmp_path, dataset):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match=r"(?s)hoper-medium-v2.*hopper-medium-v2"):
        config(tmp_path, "task=hoper-medium-v2")
    # dimensions that disagree: hopper data, HalfCheetah environment; before any training step
    with pytest.raises(ValueError, match=r"observation dim 11 in the dataset vs 17 in the environment"):
        off.train(config(tmp_path / "dims", "env.eval_env=HalfCheetah-v5"))
    assert not (tmp_path / "dims" / "checkpoint.pt").exists()
    off.train(config(tmp_path / "b", "eval.episodes=0", "optim.steps=10"))
    with pytest.raises(ValueError, match=r"another config; differing keys: \['loss.eta \(5.0 in the checkpoint, 0.5 now\)'\]"):
        off.train(config(tmp_path / "b", "eval.episodes=0", "optim.steps=10", "loss.eta=0.5", "checkpoint.resume=true"))


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path, dataset, monkeypatch):
    make_loss_nan(monkeypatch, "qvalue_loss")
    # the hand-over's checkpoint is checked first: its Q loss is NaN, so phase A's last one stays
    with pytest.raises(FloatingPointError, match=r"state after train step 0 holds non-finite losses \{'qvalue_loss': nan\}.*not written.*checkpoint.pt"):
        off.train(config(tmp_path, "eval.episodes=0"))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["phase"] == "pretrain" and state["step"] == 20
    # a step's own loss check names the step (the checkpoint check is off here)
    monkeypatch.setattr(utils, "check_state_before_saving", lambda *args: None)
    with pytest.raises(FloatingPointError, match=r"loss_qvalue \+ loss_value became nan at step 0.*checkpoint.pt"):
        off.train(config(tmp_path / "b", "eval.episodes=0"))


@pytest.mark.parametrize(
    "horizon, final",
    [
        # the authors' horizon: phase-B steps, counted in actor steps; (30 - 6) / 3 = 8 actor steps of 30
        ("30", 0.5 * (1 + np.cos(np.pi * 8 / 30))),
        ("null", 0.0),  # the actor's own 8 steps: down to 0
    ],
)
def test_actor_lr_cosine_horizon(tmp_path, horizon, final):
    cfg = config(tmp_path, "optim.warmup=6", "optim.actor_every=3", f"optim.actor_lr_decay_steps={horizon}")
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizers = {"critic": torch.optim.Adam([params[0]], lr=1.0), "actor": torch.optim.Adam([params[1]], lr=1.0)}
    schedulers = utils.make_schedulers(cfg, optimizers)
    actor_steps = [s for s in range(cfg.optim.steps) if s >= 6 and (s - 6) % 3 == 0]
    assert len(actor_steps) == 8
    for _ in range(cfg.optim.steps):
        schedulers["critic"].step()
    for _ in actor_steps:
        schedulers["actor"].step()
    assert optimizers["critic"].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert optimizers["actor"].param_groups[0]["lr"] == pytest.approx(final, abs=1e-9)


def test_paper_settings_follow_the_authors_scripts(tmp_path):
    with initialize_config_dir(config_dir=str(SCRIPT_DIR / "config"), version_base="1.3"):
        paper = compose("offline", overrides=["task=hopper-medium-v2"])
        cpu = compose("offline", overrides=["task=hopper-medium-v2", "budget=cpu"])
    assert paper.optim.actor_lr_decay_steps == paper.optim.steps == 2_000_000
    assert cpu.optim.actor_lr_decay_steps is None
    # the authors' per-task settings: hopper-medium's 20 critics; antmaze-umaze-diverse acts with one sample
    assert paper.critic.num_qvalue_nets == 20 and paper.eval.num_candidates == 10
    assert (paper.loss.eta, paper.loss.gamma, paper.loss.rho) == (0.2, 0.99, 2.0)  # hopper-medium-v2's
    # one cpu budget for every dataset (issue 36): its eta, gamma, rho and acting rule win over the task's
    with initialize_config_dir(config_dir=str(SCRIPT_DIR / "config"), version_base="1.3"):
        walker = compose("offline", overrides=["task=generated-walker2d-medium", "budget=cpu"])
    for c in (cpu, walker):
        assert (c.loss.eta, c.loss.gamma, c.loss.rho, c.loss.qvalue_target_pessimism, c.eval.num_candidates, c.eval.selection) == (
            5.0,
            0.999,
            "per_env",
            "per_env",
            3,
            "per_env",
        )
    with initialize_config_dir(config_dir=str(SCRIPT_DIR / "config"), version_base="1.3"):
        umaze_diverse = compose("offline", overrides=["task=antmaze-umaze-diverse-v2"])
    assert umaze_diverse.eval.num_candidates == 1 and umaze_diverse.loss.gamma == 0.995
    with pytest.raises(ValueError, match=r"optim.actor_lr_decay_steps=0: expected a positive integer"):
        utils.make_schedulers(config(tmp_path, "optim.actor_lr_decay_steps=0"), {"critic": None, "actor": None})
    # TINY: (30 - 5) / 2 -> 13 actor steps
    with pytest.raises(ValueError, match=r"actor_lr_decay_steps=12 is below the run's 13 actor steps"):
        utils.make_schedulers(config(tmp_path, "optim.actor_lr_decay_steps=12"), {"critic": None, "actor": None})


def test_budget_per_env_values_follow_the_datasets_env(tmp_path, dataset, capsys):
    """``budget=cpu``'s ``per_env`` values: an env's block where it has one (its Gymnasium id, a D4RL
    id, any case or version), ``default`` for what the block leaves out and for any other env; a
    value on the command line wins; ``train`` sets them from the dataset's metadata before the
    config is checked and saved; an unset one is refused by name."""
    from torchrl_bdpo.data import dataset_env_id

    def composed(*overrides):
        with initialize_config_dir(config_dir=str(SCRIPT_DIR / "config"), version_base="1.3"):
            return compose("offline", overrides=[*TINY, f"output_dir={tmp_path / 'run'}", *overrides])

    default = {"loss.rho": 0.0, "loss.qvalue_target_pessimism": None, "eval.selection": "q"}
    hopper = {**default, "loss.rho": 1.0}
    walker = {**default, "eval.selection": "average"}
    cheetah = {**default, "loss.qvalue_target_pessimism": 0.8}
    cases = (
        ("Hopper-v5", hopper),
        ("hopper-medium-v2", hopper),
        ("HOPPER-v4", hopper),
        ("Walker2d-v5", walker),
        ("HalfCheetah-v5", cheetah),
        ("halfcheetah-medium-replay-v2", cheetah),
        ("Ant-v5", default),
    )
    keys = tuple(default)
    for env_id, expected in cases:
        cfg = composed()
        assert utils.resolve_per_env(cfg, env_id) == expected, env_id
        assert tuple(OmegaConf.select(cfg, k) for k in keys) == tuple(expected[k] for k in keys), env_id
        utils.validate_config(cfg)  # each block's values pass the config's checks (a share needs aggregation lcb, no qvalue_target_rho)
    said = capsys.readouterr().out
    assert "per_env for 'Hopper-v5': loss.rho=1.0 (Hopper), loss.qvalue_target_pessimism=None (default), eval.selection=q (default)" in said
    assert "per_env for 'Walker2d-v5': loss.rho=0.0 (default), loss.qvalue_target_pessimism=None (default), eval.selection=average (Walker2d)" in said
    assert "per_env for 'HalfCheetah-v5': loss.rho=0.0 (default), loss.qvalue_target_pessimism=0.8 (HalfCheetah), eval.selection=q (default)" in said
    assert utils.resolve_per_env(composed(), None) == default
    # a command-line value replaces the placeholder: the block leaves it alone
    cfg = composed("loss.rho=0.5")
    assert utils.resolve_per_env(cfg, "Hopper-v5") == {"loss.qvalue_target_pessimism": None, "eval.selection": "q"} and cfg.loss.rho == 0.5
    assert utils.resolve_per_env(composed("loss.rho=0.5", "loss.qvalue_target_pessimism=null", "eval.selection=elite", "eval.num_elite=2"), "Hopper-v5") == {}
    # a config with no per_env table, or a key neither the block nor default has: the placeholder is named
    with pytest.raises(
        ValueError,
        match=r"loss.rho='per_env', loss.qvalue_target_pessimism='per_env', eval.selection='per_env': expected a value; the config has no per_env table",
    ):
        utils.resolve_per_env(composed("~per_env"), "Hopper-v5")
    with pytest.raises(ValueError, match=r"eval.selection='per_env': the budget's per_env table has no value for it under 'Walker2d' or 'default'"):
        utils.resolve_per_env(composed("~per_env.Walker2d.eval", "~per_env.default.eval"), "Walker2d-v5")
    # unresolved, the values are refused by name before anything runs or is built
    with pytest.raises(ValueError, match=r"loss.rho='per_env': expected a value; the offline script sets it from the dataset's env"):
        utils.validate_config(composed())
    with pytest.raises(ValueError, match=r"eval.selection='per_env': expected a value"):
        off.make_bdpo_loss(composed(), 11, 3)
    # the dataset names its env (metadata only); train sets the values from it and saves them
    assert dataset_env_id("generated/hopper/random-v0") == "Hopper-v5"
    assert dataset_env_id("hopper-medium-v2") == "hopper-medium-v2"
    for bad in ("no-such-name", "./no/such/folder"):
        with pytest.raises(FileNotFoundError, match=re.escape(repr(bad))):
            dataset_env_id(bad)
    off.train(composed("optim.steps=10", "optim.warmup=5", "eval.episodes=0"))
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert (saved.loss.rho, saved.eval.selection) == (1.0, "q")
    off.train(composed("optim.steps=10", "optim.warmup=5", "eval.episodes=0", "env.eval_env=Walker2d-v5", f"output_dir={tmp_path / 'walker'}"))
    assert OmegaConf.load(tmp_path / "walker" / "config.yaml").eval.selection == "average"  # env.eval_env names the env


def test_policy_value_probe_pins_the_monte_carlo_return_and_q():
    """Q on the policy's actions and their MC return: a terminated episode counts whole, a
    time-limited one loses the steps whose return-to-go the limit cut (gamma^k > 0.01 left).
    The soft return subtracts gamma * eta * path KL of each live next state, drawn on a fork
    of the generator that starts where the path KL's draws left it."""
    from tensordict import TensorDict

    from torchrl_bdpo.diffusion import DiffusionActor, EpsilonNetwork, make_qvalue_operator, make_schedule, make_value_operator
    from torchrl_bdpo.objectives import BDPOLoss

    torch.manual_seed(0)
    net = lambda: DiffusionActor(EpsilonNetwork(2, 3, hidden=8), make_schedule("vp", 3))  # noqa: E731
    loss = BDPOLoss(
        net(), net(), make_value_operator(3, 2, hidden=8, num_steps=3), make_qvalue_operator(3, 2, hidden=8), eta=0.2, rho=1.0, num_qvalue_nets=2, num_samples=2
    )

    def episode(T, terminated):
        term = torch.zeros(T, 1, dtype=torch.bool)
        term[-1] = terminated
        obs = torch.randn(T + 1, 3)
        return TensorDict(
            {
                "observation": obs[:-1],
                "action": torch.rand(T, 2) * 2 - 1,
                ("next", "reward"): torch.ones(T, 1),
                ("next", "terminated"): term,
                ("next", "observation"): obs[1:],
            },
            [T],
        )

    def returns_to_go(rewards, gamma):
        out, g = [], 0.0
        for r in reversed(rewards):
            g = r + gamma * g
            out.append(g)
        return out[::-1]

    gamma, scale = 0.5, 2.0  # horizon: ceil(log 0.01 / log 0.5) = 7 steps
    short = episode(4, terminated=True)  # all 4 steps kept: returns-to-go 2 * (1 - 0.5^(4-t)) / 0.5
    cut = episode(10, terminated=False)  # 10 - 7 = 3 steps kept
    torch.manual_seed(1)
    out = off.policy_value_probe(loss, [short, cut], scale, gamma, torch.device("cpu"))
    after_probe = torch.rand(3)
    mc_short = [scale * (1 - gamma ** (4 - t)) / (1 - gamma) for t in range(4)]
    mc_cut = [scale * (1 - gamma ** (10 - t)) / (1 - gamma) for t in range(3)]
    assert out["policy_probe_states"] == 7
    assert out["mc_return_policy"] == pytest.approx(np.mean(mc_short + mc_cut), rel=1e-6)
    obs = torch.cat([short["observation"], cut["observation"][:3]])
    act = torch.cat([short["action"], cut["action"][:3]])
    with torch.no_grad():
        q = loss._qvalue(loss.target_qvalue_network_params, obs, act)
    assert out["q_policy"] == pytest.approx(float(q.mean()), rel=1e-6)
    assert out["path_kl_mean"] > 0 and out["path_kl_p90"] >= out["path_kl_mean"] * 0.5
    # the same draws by hand: the path KL at the 14 states, then (forked) eta * path KL at the next states
    torch.manual_seed(1)
    states = torch.cat([short["observation"], cut["observation"]])
    with torch.no_grad():
        loss.next_state_value(states, torch.zeros(14, dtype=torch.bool), reward=torch.zeros(14))
        assert torch.equal(torch.rand(3), after_probe)  # the soft return's paths left the stream alone
        torch.manual_seed(1)
        loss.next_state_value(states, torch.zeros(14, dtype=torch.bool), reward=torch.zeros(14))
        next_states = torch.cat([short["next", "observation"], cut["next", "observation"]])
        kl = loss.next_state_value(next_states, torch.zeros(14, dtype=torch.bool), reward=torch.zeros(14))[1]
    penalty = (0.2 * kl).tolist()
    penalty[3] = 0.0  # the short episode's last next state is terminal
    soft_short = returns_to_go([scale - gamma * penalty[t] for t in range(4)], gamma)
    soft_cut = returns_to_go([scale - gamma * penalty[4 + t] for t in range(10)], gamma)[:3]
    assert out["mc_soft_return_policy"] == pytest.approx(np.mean(soft_short + soft_cut), rel=1e-5)
    assert out["mc_soft_return_policy"] < out["mc_return_policy"]
    loss.init_actor_from_behavior()  # the target actor becomes the behavior EMA: no KL left
    same = off.policy_value_probe(loss, [short, cut], scale, gamma, torch.device("cpu"))
    assert same["path_kl_mean"] == pytest.approx(0.0, abs=1e-10) and same["q_policy"] == out["q_policy"]
    assert same["mc_soft_return_policy"] == pytest.approx(same["mc_return_policy"], rel=1e-6)
    # an episode shorter than the horizon and cut by the time limit: no fair Q comparison, but
    # the path KL is still measured over its states (at gamma 0.999 every 1000-step episode is such)
    cut_only = off.policy_value_probe(loss, [episode(5, terminated=False)], scale, gamma, torch.device("cpu"))
    assert cut_only["policy_probe_states"] == 0 and "q_policy" not in cut_only and "mc_return_policy" not in cut_only
    assert "mc_soft_return_policy" not in cut_only
    assert cut_only["path_kl_mean"] == pytest.approx(0.0, abs=1e-10)  # the actor is the behavior here
    assert off.policy_value_probe(loss, [], scale, gamma, torch.device("cpu")) == {}
    # episodes without their next observations (kept by evaluate) cannot give the soft return
    with pytest.raises(KeyError, match="'next', 'observation'"):
        off.policy_value_probe(loss, [short.exclude(("next", "observation"))], scale, gamma, torch.device("cpu"))


def test_a_diverged_state_is_never_checkpointed(tmp_path, dataset, monkeypatch):
    """The update of phase-B step 9 blows Q up; the checkpoint due after it (step 10) is refused,
    and the one before (the hand-over, step 0) stays."""
    real = utils.train_step

    def diverging(update, schedulers, batch, step, o, written):
        out = real(update, schedulers, batch, step, o, written)
        if step == 9:
            with torch.no_grad():
                update.loss.qvalue_network_params.apply_(lambda p: p.mul_(1e30))
        return out

    monkeypatch.setattr(utils, "train_step", diverging)
    with pytest.raises(FloatingPointError, match=r"state after train step 10 holds non-finite .*checkpoint was not written .*checkpoint.pt"):
        off.train(config(tmp_path, "eval.episodes=0"))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["phase"] == "train" and state["step"] == 0


def test_resume_rules(tmp_path, dataset):
    """A refused resume writes nothing; evaluation settings and learning rates may change on
    resume; a resume in a fresh folder names the run that has the checkpoint."""
    base = ("eval.episodes=0", "optim.steps=10")
    off.train(config(tmp_path / "runs" / "first", *base))
    before = (tmp_path / "runs" / "first" / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"differing keys: \['loss.eta"):
        off.train(config(tmp_path / "runs" / "first", *base, "loss.eta=0.5", "checkpoint.resume=true"))
    assert (tmp_path / "runs" / "first" / "config.yaml").read_text() == before
    off.train(config(tmp_path / "runs" / "first", *base, "eval.interval=7", "optim.critic_lr=1e-4", "checkpoint.resume=true"))
    with pytest.raises(FileNotFoundError, match=r"holds no checkpoint.*hydra.run.dir=.*runs/first"):
        off.train(config(tmp_path / "runs" / "second", *base, "checkpoint.resume=true"))
    off.train(config(tmp_path / "elsewhere" / "fresh", *base, "checkpoint.resume=true"))  # nothing to resume: fresh


def test_resume_rescales_the_learning_rates(tmp_path):
    cfg = config(tmp_path, "optim.steps=20", "optim.warmup=0", "optim.actor_every=1")
    loss = off.make_bdpo_loss(cfg, 11, 3)
    optimizers = utils.make_optimizers(cfg, loss)
    schedulers = utils.make_schedulers(cfg, optimizers)
    for _ in range(5):
        for s in schedulers.values():
            s.step()
    state = utils.training_state(loss, optimizers, schedulers, "train", 5, cfg, utils.run_start(None))
    critic_lr = optimizers["critic"].param_groups[0]["lr"]
    new_cfg = config(tmp_path, "optim.steps=20", "optim.warmup=0", "optim.actor_every=1", f"optim.critic_lr={cfg.optim.critic_lr / 10}")
    optimizers2 = utils.make_optimizers(new_cfg, loss)
    schedulers2 = utils.make_schedulers(new_cfg, optimizers2)
    utils.load_checkpoint(state, new_cfg, loss, optimizers2, schedulers2)
    assert optimizers2["critic"].param_groups[0]["lr"] == pytest.approx(critic_lr / 10)
    assert optimizers2["actor"].param_groups[0]["lr"] == pytest.approx(optimizers["actor"].param_groups[0]["lr"])
    for _ in range(15):  # the cosine goes on from the same point at a tenth of the height: 0 at the end
        schedulers2["critic"].step()
    assert optimizers2["critic"].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.critic_lr / 10), 20)
    for _ in range(6):
        reference.step()
    schedulers3 = utils.make_schedulers(new_cfg, utils.make_optimizers(new_cfg, loss))
    opt3 = schedulers3["critic"].optimizer
    utils.load_checkpoint(state, new_cfg, loss, {**optimizers2, "critic": opt3}, {**schedulers2, "critic": schedulers3["critic"]})
    schedulers3["critic"].step()
    assert opt3.param_groups[0]["lr"] == pytest.approx(reference.get_last_lr()[0], rel=1e-9)


def test_truncate_csv_logs(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "eval").mkdir()
    (tmp_path / "train" / "loss.csv").write_text("0,1.0\n5,2.0\n10,3.0\n15,4.0\n")
    (tmp_path / "eval" / "return.csv").write_text("10,100.0\n20,200.0\n")
    assert utils.truncate_csv_logs(tmp_path, 10) == 3
    assert (tmp_path / "train" / "loss.csv").read_text() == "0,1.0\n5,2.0\n"
    assert (tmp_path / "eval" / "return.csv").read_text() == "10,100.0\n"  # logged before the checkpoint at 10


def test_every_bad_config_value_is_named_before_anything_runs(tmp_path, dataset):
    bad = (
        "optim.steps=-5",
        "optim.pretrain_steps=-1",
        "checkpoint.interval=0",
        "logger.log_interval=0",
        "optim.actor_every=0",
        "optim.batch_size=0",
        "loss.eta=0",
        "loss.gamma=1.5",
        "optim.critic_tau=2",
        "logger.backend=foo",
        "eval.num_candidates=0",
        "eval.aggregation=median",
        "eval.rho=-1.0",
        "loss.qvalue_target_rho=-0.5",
    )
    with pytest.raises(ValueError) as err:
        off.train(config(tmp_path / "a", *bad))
    message = str(err.value)
    for line in (
        "optim.steps=-5: expected >= 0",
        "optim.pretrain_steps=-1: expected >= 0",
        "checkpoint.interval=0: expected >= 1",
        "logger.log_interval=0: expected >= 1",
        "optim.actor_every=0: expected >= 1",
        "optim.batch_size=0: expected >= 1",
        "loss.eta=0: expected > 0",
        "loss.gamma=1.5: expected >= 0 and <= 1",
        "optim.critic_tau=2: expected > 0 and <= 1",
        "logger.backend='foo': expected one of ('csv', 'tensorboard', 'wandb', 'mlflow', 'trackio', '')",
        "eval.num_candidates=0: expected >= 1",
        "eval.aggregation='median': expected one of ('lcb', 'min', 'mean')",
        "eval.rho=-1.0: expected >= 0",
        "loss.qvalue_target_rho=-0.5: expected >= 0",
    ):
        assert line in message, line
    assert not (tmp_path / "a").exists()  # nothing written
    with pytest.raises(ValueError, match=r"optim.warmup=30: expected < optim.steps=30, or the actor never trains"):
        off.train(config(tmp_path / "b", "optim.warmup=30"))
    rule = r"eval.rho=0.5 with eval.aggregation='mean': rho weighs the std of eval.aggregation='lcb' only; set eval.aggregation=lcb or eval.rho=0"
    with pytest.raises(ValueError, match=rule):
        off.train(config(tmp_path / "g", "eval.rho=0.5"))
    with pytest.raises(ValueError, match=r"eval.rho=inf: expected a finite number >= 0"):
        off.train(config(tmp_path / "h", "eval.aggregation=lcb", "eval.rho=inf"))
    with pytest.raises(ValueError, match=r"optim.steps='ten': expected an integer"):
        off.train(config(tmp_path / "c", "optim.steps=ten"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda': this torch build or machine has no CUDA; use device=cpu"):
            off.train(config(tmp_path / "d", "device=cuda"))
        with pytest.raises(ValueError, match=r"compile.cudagraphs=true: CUDA graphs need a CUDA device, and device='cpu'"):
            off.train(config(tmp_path / "e", "compile.cudagraphs=true"))
    # a batch larger than the 300-transition dataset
    with pytest.raises(ValueError, match=r"optim.batch_size=512: expected at most the dataset's 300 transitions"):
        off.train(config(tmp_path / "f", "optim.batch_size=512"))


def test_no_evaluation_still_prints_the_summary_line(tmp_path, dataset, capsys):
    off.train(config(tmp_path, "eval.episodes=0", "optim.steps=10"))
    out = capsys.readouterr().out
    assert "trained without evaluation (eval.episodes=0) (dataset mean" in out and str(tmp_path) in out


def test_eval_aggregation_reaches_best_of_k(tmp_path, dataset, monkeypatch):
    """``eval.aggregation`` / ``eval.rho`` rank the candidates of every best-of-K evaluation (actor's and behavior's)."""
    import torchrl_bdpo.diffusion.select as select

    calls = []
    original = select.aggregate_ensemble

    def recording(values, aggregation="lcb", rho=0.0, dim=0):
        calls.append((aggregation, rho, values.shape[-1]))
        return original(values, aggregation, rho, dim)

    monkeypatch.setattr(select, "aggregate_ensemble", recording)
    off.train(config(tmp_path, "eval.aggregation=lcb", "eval.rho=1.0"))
    assert calls, "no best-of-K evaluation ran"
    assert set(calls) == {("lcb", 1.0, 3)}  # eval.num_candidates=3 in TINY


def test_eval_selection_average_skips_the_ranking(tmp_path, dataset, monkeypatch):
    """``eval.selection=average``: best-of-K evaluations average their candidates (no Q ranking); a
    bad value is a clear error before anything runs."""
    import torchrl_bdpo.diffusion.select as select

    calls = []
    monkeypatch.setattr(select, "select_by_q", lambda *a: calls.append(a) or a[0][..., 0, :])
    off.train(config(tmp_path / "avg", "eval.selection=average"))
    assert not calls
    assert json.loads((tmp_path / "avg" / "summary.json").read_text())["final"]["return_mean"] is not None
    off.train(config(tmp_path / "q"))
    assert calls  # the default ranks by Q
    with pytest.raises(ValueError, match=re.escape("eval.selection='mode'")):
        off.train(config(tmp_path / "bad", "eval.selection=mode"))
    with pytest.raises(ValueError, match=re.escape("eval.selection='average' with eval.aggregation='lcb', eval.rho=1.0")):
        off.train(config(tmp_path / "unused", "eval.selection=average", "eval.aggregation=lcb", "eval.rho=1.0"))
    with pytest.raises(ValueError, match=re.escape("eval.num_elite=None with eval.selection='elite'")):
        off.train(config(tmp_path / "elite", "eval.selection=elite"))
    elite = utils.selection_kwargs(config(tmp_path / "elite", "eval.selection=elite", "eval.num_elite=2"))
    assert (elite["selection"], elite["num_elite"]) == ("elite", 2)


def test_acting_rule_names_the_evaluations_rule(tmp_path):
    """The figures and the printed result name the acting rule the evaluations used, not always
    "best of K" (under ``eval.selection=average`` they showed the mean of the candidates as best of K)."""
    cases = [
        ((), "best of 3 by Q"),  # TINY config: 3 candidates, the paper's argmax of the ensemble mean
        (("eval.num_candidates=10",), "best of 10 by Q"),
        (("eval.num_candidates=1",), "one sample"),
        (("eval.selection=average",), "mean of 3 candidates"),
        (("eval.selection=elite", "eval.num_elite=2"), "mean of the 2 best of 3 by Q"),
        (("eval.aggregation=lcb", "eval.rho=1.0"), "best of 3 by Q's lcb, rho 1"),
        (("eval.aggregation=min",), "best of 3 by Q's min"),
    ]
    for overrides, expected in cases:
        cfg = config(tmp_path, "eval.num_candidates=3", *overrides)
        assert utils.acting_rule(cfg) == expected, overrides


def test_selection_probe_plays_each_rule_as_the_acting_module_does(tmp_path, dataset):
    """benchmarks/selection_probe.py on a finished run: each rule's returns are those of the
    loss's own acting module with that rule, from the same initial states."""
    from torchrl.envs.utils import ExplorationType

    from tests.loaders import load_benchmark
    from torchrl_bdpo import checkpoint as checkpoint_io
    from torchrl_bdpo.data import make_offline_buffer
    from torchrl_bdpo.envs import eval_env_id, eval_seed, evaluate, make_eval_env

    probe = load_benchmark("selection_probe")
    run = tmp_path / "run"
    off.train(config(run))
    results = probe.main(
        [str(run), "--rules", "one", "mean/3", "min/3", "lcb-1.5/2", "avg/3", "elite2/3", "--candidates", "actor", "behavior", "--episodes", "2"]
        + ["--out", str(tmp_path / "p.json"), "--plot", str(tmp_path / "p.png")]
    )
    rows = {(r["candidates"], r["name"]): r for r in results[0]["rules"]}
    assert len(rows) == 12 and json.loads((tmp_path / "p.json").read_text())["runs"][0]["rules"][1]["name"] == "mean/3"
    assert (tmp_path / "p.png").stat().st_size > 0
    assert results[0]["dataset_return"] == pytest.approx(15.1, abs=0.05)  # the tiny random set's, as the script prints it
    cfg = OmegaConf.load(run / "config.yaml")
    info = make_offline_buffer(cfg.env.dataset, cfg.optim.batch_size, reward_mode=cfg.env.reward_mode).dataset_info
    loss = utils.make_bdpo_loss(cfg, info.observation_dim, info.action_dim)
    loss.load_state_dict(checkpoint_io.load_checkpoint(run / "checkpoint.pt")["loss"])
    env = make_eval_env(eval_env_id(info, cfg.env.get("eval_env")), 1, eval_seed(cfg.seed), "cpu", info.action_scaling())
    for name, exploration, kwargs in (  # in another order than the probe's: each rule starts from the same states
        ("lcb-1.5/2", ExplorationType.DETERMINISTIC, dict(num_candidates=2, aggregation="lcb", rho=1.5)),
        ("one", ExplorationType.RANDOM, dict(num_candidates=1)),
        ("mean/3", ExplorationType.DETERMINISTIC, dict(num_candidates=3)),
        ("avg/3", ExplorationType.DETERMINISTIC, dict(num_candidates=3, selection="average")),
        ("elite2/3", ExplorationType.DETERMINISTIC, dict(num_candidates=3, selection="elite", num_elite=2)),
    ):
        torch.manual_seed(0)
        returns = evaluate(env, loss.make_acting_module(**kwargs), 2, cfg.eval.max_steps, exploration, seed=eval_seed(cfg.seed))
        assert rows["actor", name]["returns"] == pytest.approx(returns.tolist(), rel=1e-6), name
    pooled = probe.main([str(run), "--rules", "mean/2", "--candidates", "pooled", "--episodes", "1"])[0]["rules"][0]
    assert pooled["candidates"] == "pooled" and 0 <= pooled["actor_pick_fraction"] <= 1 and len(pooled["returns"]) == 1
    with pytest.raises(ValueError, match=re.escape("--candidates pooled with rules ['one']")):
        probe.main([str(run), "--rules", "one", "mean/2", "--candidates", "pooled"])
    for bad in ("median/10", "mean-2/10", "lcb/0", "best", "avg-1/3", "avg/0", "elite4/3", "elite0/3"):
        with pytest.raises(ValueError, match=re.escape(f"rule {bad!r}")):
            probe.parse_rule(bad)
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        probe.main([str(tmp_path / "nowhere")])


def test_q_spread_reads_the_ensembles_spread_and_the_q_targets_rho(tmp_path, dataset):
    """benchmarks/q_spread.py on a finished run: the Q target's LCB weight is the run's
    (``loss.qvalue_target_rho`` over ``loss.rho``), the cost ratio is gamma x rho_Q x spread /
    reward, and an ensemble whose members are one copy has no spread at all."""
    from tests.loaders import load_benchmark
    from torchrl_bdpo import checkpoint as checkpoint_io

    spread = load_benchmark("q_spread")
    run = tmp_path / "run"
    off.train(config(run, "loss.rho=1.0", "loss.qvalue_target_rho=0.25"))
    row = spread.main([str(run), "--pairs", "64", "--out", str(tmp_path / "s.json")])[0]
    assert (row["rho"], row["rho_q"], row["pairs"]) == (1.0, 0.25, 64)
    assert row["spread_data"] > 0 and row["spread_next"] > 0
    assert row["spread_actor_same"] > 0 and row["spread_behavior_same"] > 0 and 0 <= row["frac_actor_below_data"] <= 1
    assert -1 <= row["spread_q_corr"] <= 1 and row["spread_per_q"] > 0
    assert row["cost_ratio"] == pytest.approx(row["gamma"] * 0.25 * row["spread_next"] / row["reward"])
    assert row["spread_per_reward"] == pytest.approx(row["spread_next"] / row["reward"])
    assert json.loads((tmp_path / "s.json").read_text())["runs"][0]["spread_next"] == row["spread_next"]
    # every member a copy of the first: no spread, so the lower bound costs nothing
    state = checkpoint_io.load_checkpoint(run / "checkpoint.pt")
    for key, value in state["loss"].items():
        if "qvalue_network_params" in key:
            value.copy_(value[:1].expand_as(value))
    checkpoint_io.save_checkpoint(run / "checkpoint.pt", state)
    same = spread.main([str(run), "--pairs", "64"])[0]
    assert same["spread_data"] == pytest.approx(0, abs=1e-5) and same["spread_next"] == pytest.approx(0, abs=1e-5)
    assert same["spread_actor_same"] == pytest.approx(0, abs=1e-5) and same["spread_behavior_same"] == pytest.approx(0, abs=1e-5)
    assert same["spread_per_q"] == pytest.approx(0, abs=1e-5)
    assert same["q_data"] != pytest.approx(row["q_data"])  # the members changed, so did their mean
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        spread.main([str(tmp_path / "nothing")])
    # an adaptive weight: the one the loss's rule sets on these pairs, costing the share
    adaptive = tmp_path / "adaptive"
    off.train(config(adaptive, "loss.qvalue_target_pessimism=0.5"))
    row = spread.main([str(adaptive), "--pairs", "64"])[0]
    assert row["qvalue_target_pessimism"] == 0.5 and row["rho_q"] > 0
    assert row["rho_q"] == pytest.approx(0.5 * row["reward_abs"] / (row["gamma"] * row["spread_next"]), rel=1e-4)
    assert row["cost_ratio"] == pytest.approx(0.5 * row["reward_abs"] / row["reward"], rel=1e-4)
