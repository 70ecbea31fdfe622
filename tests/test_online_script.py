"""sota-implementations/bdpo/bdpo_online.py: online (uniform reference) and offline-to-online runs, tiny."""

import json
import time
import warnings
from importlib import metadata

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from torchrl_bdpo import checkpoint as checkpoint_io

from tests.loaders import SCRIPT_DIR, load_script

pytestmark = pytest.mark.filterwarnings("ignore")

online = load_script("bdpo_online")

TINY = """
collector.total_frames=400 collector.frames_per_batch=100 collector.init_random_frames=100 optim.warmup=20
optim.actor_every=2 optim.batch_size=32 optim.utd_ratio=0.5 diffusion.hidden=16
diffusion.depth=2 critic.hidden=16 eval.interval=200 eval.episodes=2
eval.max_steps=20 eval.num_candidates=3 logger.log_interval=100 checkpoint.interval=200 reference_fit.steps=10
""".split()


def config(tmp_path, *overrides, name="online"):
    with initialize_config_dir(config_dir=str(SCRIPT_DIR / "config"), version_base="1.3"):
        return compose(name, overrides=[*(TINY if name == "online" else []), f"output_dir={tmp_path}", *overrides])


def test_online_run_outputs(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = online.train(config(tmp_path))
    # its Collector is told the acting module needs no InitTracker (torchrl 0.14 warns otherwise)
    assert not [w for w in caught if "missing transforms required by the policy" in str(w.message)]
    assert summary["frames"] == 400
    # updates start once init_random_frames are in: after each of the 4 batches, 100 frames x utd 0.5
    assert summary["updates"] == 200
    for name in ("summary.json", "learning_curve.png", "checkpoint.pt", "config.yaml"):
        assert (tmp_path / name).exists(), name
    rows = summary["evaluations"]
    assert [r["frames"] for r in rows] == [200, 400]
    for r in rows:
        assert r["return_mean"] <= 0 and r["return_one_sample_mean"] <= 0  # Pendulum's rewards are <= 0
    assert json.loads((tmp_path / "summary.json").read_text())["final"] == rows[-1]
    logs = tmp_path / "logs" / "bdpo_online" / "scalars"
    assert (logs / "train" / "loss_actor.csv").exists() and (logs / "eval" / "return_one_sample_mean.csv").exists()
    # the fresh actor was fitted to the uniform reference before its first update, once
    fit = summary["reference_fit"]
    assert fit["kl_end"] < fit["kl_start"] and fit["seconds"] > 0
    assert (logs / "train" / "reference_fit_kl_end.csv").read_text().splitlines() == [f"100,{fit['kl_end']}"]
    # Pendulum's episodes (200 steps) end in the training curve
    assert len(summary["train_episode_returns"]) >= 1
    # the time split: collection (acting, env steps), updates, evaluations, within the wall time
    seconds = summary["time_s"]
    assert set(seconds) == {"collect", "update", "eval"} and min(seconds.values()) > 0
    assert sum(seconds.values()) <= summary["wall_time_s"]


def test_evaluations_probe_q_on_the_policy_actions_without_moving_the_training(tmp_path, monkeypatch):
    """Every evaluation logs Q on the best-of-K policy's actions against their Monte Carlo
    return (scaled rewards) and the path KL per state. The probe draws paths on a forked
    generator: the run is the one it would be without it, to the last parameter."""
    # gamma 0.5: a horizon of 7 steps, so 13 of each 20-step evaluation episode have an exact return
    summary = online.train(config(tmp_path / "probe", "loss.gamma=0.5", "env.reward_scale=2.0"))
    for r in summary["evaluations"]:
        assert r["policy_probe_states"] == 2 * 13
        assert r["mc_return_policy"] < 0 and np.isfinite(r["q_policy"])  # Pendulum's rewards are <= 0
        assert r["path_kl_mean"] > 0 and r["path_kl_p90"] > 0
        assert r["mc_soft_return_policy"] < r["mc_return_policy"]  # less eta * path KL > 0 at each live next state
        # the one-sample policy's own episodes (other actions, so another Q and other returns)
        assert r["policy_probe_states_one_sample"] == 2 * 13 and r["q_policy_one_sample"] != r["q_policy"]
        assert r["mc_soft_return_policy_one_sample"] < r["mc_return_policy_one_sample"] < 0
    logs = tmp_path / "probe" / "logs" / "bdpo_online" / "scalars" / "eval"
    assert all((logs / f"{k}{x}.csv").exists() for k in ("q_policy", "mc_return_policy", "mc_soft_return_policy") for x in ("", "_one_sample"))
    monkeypatch.setattr(online, "policy_value_probe", lambda *args, **kwargs: {})
    without = online.train(config(tmp_path / "without", "loss.gamma=0.5", "env.reward_scale=2.0"))
    keep = ("frames", "updates", "eta", "return_mean", "return_std", "return_one_sample_mean", "return_one_sample_std")
    assert [{k: r[k] for k in keep} for r in summary["evaluations"]] == [{k: r[k] for k in keep} for r in without["evaluations"]]
    a = checkpoint_io.load_checkpoint(tmp_path / "probe" / "checkpoint.pt")
    b = checkpoint_io.load_checkpoint(tmp_path / "without" / "checkpoint.pt")
    for key, value in a["loss"].items():
        torch.testing.assert_close(b["loss"][key], value, rtol=0, atol=0, msg=key)


def test_resume_gives_the_same_run(tmp_path, monkeypatch):
    """A crash after the first checkpoint, then checkpoint.resume=true: the same evaluations and
    the same final parameters as the run that never stopped."""
    straight = online.train(config(tmp_path / "a"))
    calls = {"n": 0}
    real = online.train_step

    def crash_later(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 130:  # after the 200-frame checkpoint (100 updates), before the next
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(online, "train_step", crash_later)
    with pytest.raises(KeyboardInterrupt):
        online.train(config(tmp_path / "b"))
    monkeypatch.setattr(online, "train_step", real)
    before = checkpoint_io.load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    t0 = time.perf_counter()
    resumed = online.train(config(tmp_path / "b", "checkpoint.resume=true"))
    second_process = time.perf_counter() - t0
    # the wall time and its split cover the whole run, not only the process that finished it
    assert resumed["wall_time_s"] > second_process and resumed["wall_time_s"] >= before["elapsed_s"]
    assert all(resumed["time_s"][k] >= v for k, v in before["time_s"].items()) and before["time_s"]["update"] > 0
    assert sum(resumed["time_s"].values()) <= resumed["wall_time_s"]
    assert resumed["evaluations"] == straight["evaluations"]
    assert resumed["updates"] == straight["updates"]
    a = checkpoint_io.load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = checkpoint_io.load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    for key, value in a["loss"].items():
        torch.testing.assert_close(b["loss"][key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(b["replay"]["data"]["observation"], a["replay"]["data"]["observation"], rtol=0, atol=0)


def test_automatic_eta_moves_and_is_logged(tmp_path):
    summary = online.train(config(tmp_path, "auto_eta.enabled=true", "auto_eta.lr=0.05"))
    etas = [r["eta"] for r in summary["evaluations"]]
    assert etas[-1] != pytest.approx(0.05)  # moved from the configured start
    assert (tmp_path / "logs" / "bdpo_online" / "scalars" / "train" / "eta.csv").exists()
    state = checkpoint_io.load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["eta"]["log_eta"].exp().item() == pytest.approx(etas[-1], rel=1e-5)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """A tiny Hopper dataset and a finished tiny offline BDPO run on it."""
    import os

    from torchrl_bdpo.data.generate import GenerateConfig, generate

    root = tmp_path_factory.mktemp("o2o")
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root / "minari")
    generate(GenerateConfig(levels=("random",), num_transitions=300, out_dir=str(root / "gen"), random_return_episodes=3, progress=False))
    off = load_script("bdpo_offline")
    from tests.test_offline_script import TINY as OFFLINE_TINY

    cfg = config(root / "offline", *OFFLINE_TINY, "eval.episodes=0", name="offline")
    off.train(cfg)
    yield root / "offline"
    if old is None:
        os.environ.pop("MINARI_DATASETS_PATH")
    else:
        os.environ["MINARI_DATASETS_PATH"] = old


O2O = ["mode=offline2online", "env.name=null", "collector.init_random_frames=0", "reference=behavior", "reference_fit.steps=0"]


@pytest.mark.parametrize("reference", ["behavior", "behavior_train"])
def test_offline_to_online_starts_from_the_offline_run(tmp_path, offline_run, reference):
    start = checkpoint_io.load_checkpoint(offline_run / "checkpoint.pt")["loss"]
    summary = online.train(config(tmp_path, *O2O, f"offline.run={offline_run}", f"reference={reference}"))
    rows = summary["evaluations"]
    assert [r["frames"] for r in rows] == [0, 200, 400]  # the offline start, then every interval
    assert all(r["start_return"] == rows[0]["return_mean"] for r in rows)
    assert summary["config"]["diffusion"]["hidden"] == 16  # the offline run's networks
    # and its optimiser settings where the online config leaves them null (the cpu budget's)
    assert summary["config"]["optim"]["actor_lr"] == 1e-5 and summary["config"]["optim"]["critic_tau"] == 0.05
    assert summary["config"]["optim"]["batch_size"] == 32  # set here: not inherited
    end = checkpoint_io.load_checkpoint(tmp_path / "checkpoint.pt")
    behavior = [k for k in start if k.startswith("behavior_network_params")]
    same = all(torch.equal(start[k], end["loss"][k]) for k in behavior)
    assert same == (reference == "behavior")  # frozen, or trained on the replay
    # the online half of the replay holds rewards on the dataset's scale: Hopper pays ~1 per step
    # (the healthy reward) near a random policy, and this dataset's scale is ~1000 / (its returns' range)
    from omegaconf import OmegaConf

    from torchrl_bdpo.data import make_offline_buffer

    dataset = OmegaConf.load(offline_run / "config.yaml").env.dataset
    scale = make_offline_buffer(dataset, 8, download=False).dataset_info.reward_scale
    assert scale > 5
    per_step = float(end["replay"]["data"]["next"]["reward"].mean()) / scale
    assert 0.5 < per_step < 1.5, per_step


def test_offline_to_online_runs_the_offline_phases_first(tmp_path, offline_run):
    """offline.overrides: bdpo_offline.py runs into <output_dir>/offline, then collection starts from it."""
    from tests.test_offline_script import TINY as OFFLINE_TINY

    overrides = ",".join(f'"{o}"' for o in [*OFFLINE_TINY, "eval.episodes=0"])  # hydra's quoted list items
    cfg = config(tmp_path, *O2O, "collector.total_frames=200", f"offline.overrides=[{overrides}]")
    with initialize_config_dir(config_dir=str(SCRIPT_DIR / "config"), version_base="1.3"):
        summary = online.train(cfg)
    offline = tmp_path / "offline"
    assert (offline / "summary.json").exists() and (offline / "checkpoint.pt").exists()
    assert summary["frames"] == 200 and summary["evaluations"][0]["frames"] == 0


def test_offline_to_online_harness_runs_both_arms_from_one_start(tmp_path, offline_run):
    """benchmarks/offline_to_online.py: the 50/50 arm and continued offline training (offline_fraction=1)
    from the same offline checkpoint, evaluated at the same frames; a second call reads the finished runs."""
    from tests.loaders import load_benchmark

    harness = load_benchmark("offline_to_online")
    argv = [
        "--offline-run",
        str(offline_run),
        "--frames",
        "200",
        "--frames-per-batch",
        "100",
        "--eval-every",
        "100",
        "--episodes",
        "1",
        "--dip-frames",
        "100",
        "--out-dir",
        str(tmp_path),
        "--online",
        "optim.batch_size=32",
        "eval.max_steps=20",
        "eval.num_candidates=3",
    ]
    result = harness.main(argv)
    online_run, offline_only = result["runs"]["online"]["0"], result["runs"]["offline"]["0"]
    for run in (online_run, offline_only):
        assert [e["frames"] for e in run["evals"]] == [0, 100, 200]
        assert run["final_over_start"] == pytest.approx(run["final"] / run["start"])
        assert run["min_over_start_first_frames"] == pytest.approx(run["evals"][1]["mean"] / run["start"])
    assert online_run["start"] == offline_only["start"]  # the same checkpoint, the same evaluation states
    for run in (online_run, offline_only):  # one window of 5000 frames: every training episode of the 200 frames
        saved = json.loads((tmp_path / ("online_seed0" if run is online_run else "offline_seed0") / "summary.json").read_text())
        assert [b["count"] for b in run["train_episodes"]] == [len(saved["train_episode_returns"])]
    assert online_run["evals"][-1]["updates"] == offline_only["evals"][-1]["updates"] == 200
    for arm, fraction in (("online", 0.5), ("offline", 1.0)):
        saved = json.loads((tmp_path / f"{arm}_seed0" / "summary.json").read_text())
        assert saved["config"]["replay"]["offline_fraction"] == fraction
    assert (tmp_path / "offline_to_online.png").exists()
    assert online_run["acting_rule"] == offline_only["acting_rule"] == "best of 3 by Q"  # the figure's label
    assert result["machine"]["torchrl"] == metadata.version("torchrl")  # what made the numbers
    assert harness.main(argv)["runs"] == result["runs"]  # finished runs are read, not run again
    with pytest.raises(SystemExit):
        harness.main(["--offline-run", "a", "b", "--seeds", "0", "1", "2"])


def test_offline_to_online_bins_the_training_episodes():
    from tests.loaders import load_benchmark

    harness = load_benchmark("offline_to_online")
    bins = harness.binned_episodes([(900, 10.0), (1000, 20.0), (1500, 60.0), (2100, 5.0)], 3000, 1000)
    assert [b["frames"] for b in bins] == [1000, 2000, 3000]
    assert [b["count"] for b in bins] == [2, 1, 1]
    assert bins[0]["mean"] == 15.0 and bins[0]["sem"] == pytest.approx(5.0)  # std (ddof 1) 7.07 / sqrt 2
    assert bins[1]["mean"] == 60.0 and bins[1]["sem"] is None
    assert harness.binned_episodes([], 1000, 1000) == [{"frames": 1000, "count": 0, "mean": None, "sem": None}]


def test_bad_inputs(tmp_path, offline_run):
    with pytest.raises(ValueError, match="mode=offline2online needs an offline start"):
        online.train(config(tmp_path / "a", "mode=offline2online", "reference=behavior"))
    with pytest.raises(ValueError, match="reference='uniform': mode=offline2online takes one of"):
        online.train(config(tmp_path / "b", *O2O, "reference=uniform", f"offline.run={offline_run}"))
    with pytest.raises(FileNotFoundError, match="checkpoint.pt not found"):
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "config.yaml").write_text((offline_run / "config.yaml").read_text())
        online.train(config(tmp_path / "c", *O2O, f"offline.run={empty}"))
    with pytest.raises(ValueError, match="observation dim"):
        online.train(
            config(
                tmp_path / "d",
                *O2O[:1],
                "env.name=Pendulum-v1",
                "collector.init_random_frames=0",
                "reference=behavior",
                "reference_fit.steps=0",
                f"offline.run={offline_run}",
            )
        )
    with pytest.raises(ValueError, match="collector.total_frames=450: expected a multiple"):
        online.train(config(tmp_path / "e", "collector.total_frames=450"))
    with pytest.raises(ValueError, match="reference_fit.steps=5: mode=offline2online starts the actor from the offline run"):
        online.train(config(tmp_path / "h", *O2O, "reference_fit.steps=5", f"offline.run={offline_run}"))
    with pytest.raises(ValueError, match="reference_fit.batch_size=0: expected an integer >= 1"):
        online.train(config(tmp_path / "i", "reference_fit.batch_size=0"))
    with pytest.raises(ValueError, match="optim.utd_ratio=0"):
        online.train(config(tmp_path / "f", "optim.utd_ratio=0"))
    with pytest.raises(ValueError, match=r"replay.offline_fraction=1.5: expected a number in \(0, 1\]"):
        online.train(config(tmp_path / "g", "replay.offline_fraction=1.5"))


def test_uniform_reference_needs_a_unit_action_box():
    from torchrl_bdpo.envs import action_scaling_for, check_unit_action_box, make_env

    env = make_env("Pendulum-v1")
    with pytest.raises(ValueError, match=r"low=\[-2.0\], high=\[2.0\].*ActionScaling"):
        check_unit_action_box(env, "the uniform reference")
    scaled = online.make_train_env("Pendulum-v1", 0)
    check_unit_action_box(scaled)
    scaling = action_scaling_for(env)
    assert scaling.scale.tolist() == [2.0] and scaling.loc.tolist() == [0.0]


def test_online_vs_sac_harness_evaluates_both_at_the_same_frames(tmp_path):
    from tests.loaders import load_benchmark

    harness = load_benchmark("online_vs_sac")
    before = torch.get_num_threads()
    try:  # --threads sets the process's torch threads (both algorithms run here)
        result = harness.main(
            [
                "--frames",
                "400",
                "--frames-per-batch",
                "100",
                "--init-random-frames",
                "100",
                "--eval-every",
                "200",
                "--episodes",
                "2",
                "--utd-ratio",
                "0.25",
                "--out-dir",
                str(tmp_path),
                "--threads",
                "1",
                "--bdpo",
                "diffusion.hidden=16",
                "critic.hidden=16",
                "optim.warmup=10",
            ]
        )
    finally:
        torch.set_num_threads(before)
    bdpo, sac = result["runs"]["bdpo"]["0"], result["runs"]["sac"]["0"]
    assert [e["frames"] for e in bdpo["evals"]] == [e["frames"] for e in sac["evals"]] == [200, 400]
    assert bdpo["frames_per_s"] > 0 and sac["frames_per_s"] > 0
    assert all(e["alpha"] > 0 and "entropy" in e for e in sac["evals"])  # SAC's temperature and entropy, logged
    assert all(e["policy_probe_states"] == 0 and "q_policy" not in e for e in sac["evals"])  # the same probe, same episodes
    # BDPO's evaluations carry the probe: the path KL per state (the 2 Pendulum episodes run 200
    # steps to their time limit, fewer than the horizon at gamma 0.99: no exact return, no Q row)
    assert all(e["path_kl_mean"] > 0 and e["policy_probe_states"] == 0 and "q_policy" not in e for e in bdpo["evals"])
    for run in (bdpo, sac):  # both split their time the same way, within their wall time
        assert min(run["time_s"].values()) > 0 and sum(run["time_s"].values()) <= run["wall_s"]
    assert (tmp_path / "online_vs_sac.png").exists()
    assert result["machine"]["threads"] == 1 and "threads=1" in bdpo["overrides"]
    assert result["machine"]["torch"] == metadata.version("torch") and result["machine"]["cpu"]
    assert json.loads((tmp_path / "online_vs_sac.json").read_text())["runs"]["sac"]["0"]["evals"] == sac["evals"]
    # both log their training episodes as (frames, return): Pendulum's end at its 200-step limit
    for run in (bdpo, sac):
        assert [f for f, _ in run["train_returns"]] == [200, 400] and all(r < 0 for _, r in run["train_returns"])


def test_harness_counts_training_episodes_across_batches():
    """``episode_ends`` sums each episode's rewards across collector batches, as ``RewardSum`` does."""
    from tensordict import TensorDict

    from tests.loaders import load_benchmark

    harness = load_benchmark("online_vs_sac")

    def batch(rewards, dones):
        n = len(rewards)
        return TensorDict({"next": {"reward": torch.tensor(rewards).reshape(1, n, 1), "done": torch.tensor(dones).reshape(1, n, 1)}}, [1, n])

    ends, running = harness.episode_ends(batch([1.0, 2.0, 3.0], [False, True, False]), 3, 0.0)
    assert ends == [(3, 3.0)] and running == 3.0
    ends, running = harness.episode_ends(batch([4.0, 5.0, 6.0], [True, False, True]), 6, running)
    assert ends == [(6, 7.0), (6, 11.0)] and running == 0.0


def test_sac_probe_reads_sacs_target_q_on_its_own_actions():
    """The harness's SAC probe: the mean of SACLoss's two target Qs (not its online ones), on the
    steps whose Monte Carlo return is exact, against that return (q_policy_probe)."""
    from tensordict import TensorDict

    from torchrl_bdpo.data.generate import make_sac
    from tests.loaders import load_benchmark

    harness = load_benchmark("online_vs_sac")
    import utils  # the scripts' helpers (on sys.path once load_script ran)

    torch.manual_seed(0)
    _, loss = make_sac(online.make_train_env("Pendulum-v1", 0), 16, 0.99)
    loss.target_qvalue_network_params.apply_(lambda t: t.data.copy_(torch.randn_like(t)))  # targets apart from the online Qs
    obs, act = torch.randn(6, 3), torch.rand(6, 1) * 2 - 1
    want = []
    with torch.no_grad():
        for i in range(2):
            with loss.target_qvalue_network_params[i].to_module(loss.qvalue_network):
                want.append(loss.qvalue_network(TensorDict({"observation": obs, "action": act}, [6])).get("state_action_value"))
        got = harness.sac_target_q(loss)(obs, act)
    torch.testing.assert_close(got, (want[0] + want[1]) / 2)
    # an episode that fell after 4 steps and one cut by its time limit at 10 (gamma 0.5: 7 steps of horizon)
    T = (4, 10)
    episodes = [
        TensorDict(
            {
                "observation": obs.repeat(2, 1)[:t],
                "action": act.repeat(2, 1)[:t],
                ("next", "reward"): -torch.ones(t, 1),
                ("next", "terminated"): torch.arange(t).unsqueeze(-1) == t - 1 if t == 4 else torch.zeros(t, 1, dtype=torch.bool),
            },
            [t],
        )
        for t in T
    ]
    out = utils.q_policy_probe(harness.sac_target_q(loss), episodes, 1.0, 0.5, torch.device("cpu"))
    assert out["policy_probe_states"] == 4 + 3
    mc = [-(1 - 0.5 ** (4 - t)) / 0.5 for t in range(4)] + [-(1 - 0.5 ** (10 - t)) / 0.5 for t in range(3)]
    assert out["mc_return_policy"] == pytest.approx(np.mean(mc), rel=1e-6)
    rows_obs = torch.cat([obs.repeat(2, 1)[:4], obs.repeat(2, 1)[:3]])
    rows_act = torch.cat([act.repeat(2, 1)[:4], act.repeat(2, 1)[:3]])
    with torch.no_grad():
        assert out["q_policy"] == pytest.approx(float(harness.sac_target_q(loss)(rows_obs, rows_act).mean()), rel=1e-6)


def test_sac_soft_return_subtracts_what_sacs_own_target_subtracts():
    """The SAC probe's next-state penalty is alpha * log pi(a'|s') with SACLoss's own draw: SACLoss's
    TD target is r + gamma * (min target Q at that a' - the penalty).
    The probe's soft return uses it with gamma, and draws nothing the run would see (the harness
    forks the generator)."""
    from tensordict import TensorDict

    from torchrl_bdpo.data.generate import make_sac
    from tests.loaders import load_benchmark

    harness = load_benchmark("online_vs_sac")
    import utils

    torch.manual_seed(0)
    _, loss = make_sac(online.make_train_env("Pendulum-v1", 0), 16, 0.99)
    loss.target_qvalue_network_params.apply_(lambda t: t.data.copy_(torch.randn_like(t)))
    with torch.no_grad():
        loss.log_alpha.fill_(np.log(0.3))
    B = 8
    obs, next_obs, reward = torch.randn(B, 3), torch.randn(B, 3), torch.randn(B, 1)
    batch = TensorDict(
        {
            "observation": obs,
            "action": torch.rand(B, 1) * 2 - 1,
            "next": {
                "observation": next_obs,
                "reward": reward,
                "done": torch.zeros(B, 1, dtype=torch.bool),
                "terminated": torch.zeros(B, 1, dtype=torch.bool),
                "truncated": torch.zeros(B, 1, dtype=torch.bool),
            },
        },
        [B],
    )
    torch.manual_seed(5)
    sac_target = loss._compute_target_v2(batch).reshape(B)  # r + gamma * (min_k Q'_k(s', a') - alpha log pi(a'|s'))
    torch.manual_seed(5)
    with torch.no_grad():
        penalty = harness.sac_next_penalty(loss)(next_obs).reshape(B)
        torch.manual_seed(5)
        with loss.actor_network_params.to_module(loss.actor_network):
            next_action = loss.actor_network.get_dist(TensorDict({"observation": next_obs}, [B])).rsample()
        q = []
        for i in range(2):
            with loss.target_qvalue_network_params[i].to_module(loss.qvalue_network):
                q.append(loss.qvalue_network(TensorDict({"observation": next_obs, "action": next_action}, [B])).get("state_action_value"))
        min_q = torch.minimum(q[0], q[1]).reshape(B)
    torch.testing.assert_close(sac_target, reward.reshape(B) + 0.99 * (min_q - penalty), rtol=1e-5, atol=1e-5)
    # in the probe: one episode that falls after 3 steps, gamma 0.5, a constant reward of 1
    T = 3
    episode = TensorDict(
        {
            "observation": obs[:T],
            "action": torch.zeros(T, 1),
            ("next", "reward"): torch.ones(T, 1),
            ("next", "terminated"): torch.arange(T).unsqueeze(-1) == T - 1,
            ("next", "observation"): next_obs[:T],
        },
        [T],
    )
    torch.manual_seed(7)
    out = utils.q_policy_probe(harness.sac_target_q(loss), [episode], 1.0, 0.5, torch.device("cpu"), next_penalty=harness.sac_next_penalty(loss))
    torch.manual_seed(7)
    with torch.no_grad():
        p = harness.sac_next_penalty(loss)(next_obs[:T]).reshape(T).tolist()
    soft = [1 - 0.5 * p[0] + 0.5 * (1 - 0.5 * p[1] + 0.5 * 1), 1 - 0.5 * p[1] + 0.5 * 1, 1.0]  # s'_3 is terminal: no penalty
    assert out["mc_soft_return_policy"] == pytest.approx(np.mean(soft), rel=1e-5)
    assert out["mc_return_policy"] == pytest.approx(np.mean([1.75, 1.5, 1.0]), rel=1e-6)


def test_online_vs_sac_harness_runs_one_algorithm_and_merges(tmp_path):
    """--algos runs one algorithm; --merge joins runs made apart and refuses unlike settings."""
    from tests.loaders import load_benchmark

    harness = load_benchmark("online_vs_sac")
    tiny = "--frames 200 --frames-per-batch 100 --init-random-frames 100 --eval-every 100 --episodes 1 --utd-ratio 0.25".split()
    before = torch.get_num_threads()
    try:
        sac = harness.main([*tiny, "--algos", "sac", "--seeds", "1", "--threads", "1", "--out-dir", str(tmp_path / "sac1")])
        bdpo = harness.main(
            [
                *tiny,
                "--algos",
                "bdpo",
                "--seeds",
                "0",
                "--threads",
                "1",
                "--out-dir",
                str(tmp_path / "bdpo0"),
                "--bdpo",
                "diffusion.hidden=16",
                "critic.hidden=16",
            ]
        )
    finally:
        torch.set_num_threads(before)
    assert list(sac["runs"]["sac"]) == ["1"] and sac["runs"]["bdpo"] == {}
    assert list(bdpo["runs"]["bdpo"]) == ["0"] and bdpo["runs"]["sac"] == {}
    merged = harness.main(["--merge", str(tmp_path / "sac1"), str(tmp_path / "bdpo0"), "--out-dir", str(tmp_path / "all")])
    assert merged["runs"]["sac"]["1"]["evals"] == sac["runs"]["sac"]["1"]["evals"]
    assert merged["runs"]["bdpo"]["0"]["evals"] == bdpo["runs"]["bdpo"]["0"]["evals"]
    assert merged["runs"]["sac"]["1"]["threads"] == 1
    assert (tmp_path / "all" / "online_vs_sac.png").exists()
    assert json.loads((tmp_path / "all" / "online_vs_sac.json").read_text())["runs"]["bdpo"]["0"]["evals"] == bdpo["runs"]["bdpo"]["0"]["evals"]
    with pytest.raises(SystemExit):  # the same seed twice
        harness.main(["--merge", str(tmp_path / "sac1"), str(tmp_path / "sac1"), "--out-dir", str(tmp_path / "x")])
    other = json.loads((tmp_path / "sac1" / "online_vs_sac.json").read_text())
    other["settings"]["frames"] = 400
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "online_vs_sac.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="frames=400 there but 200"):
        harness.merge([str(tmp_path / "bdpo0"), str(tmp_path / "other")])
    with pytest.raises(FileNotFoundError, match="no online_vs_sac.json there"):
        harness.merge([str(tmp_path / "missing")])


def test_online_budgets():
    """online_budget=cpu compiles the update; the default leaves online.yaml as it is."""
    with initialize_config_dir(config_dir=str(SCRIPT_DIR / "config"), version_base="1.3"):
        default = compose("online")
        cpu = compose("online", overrides=["online_budget=cpu", "env.name=Hopper-v5"])
    assert default.compile.compile is False and cpu.compile.compile is True
    # nothing else moves: the budget is the compile switch alone
    cpu.compile.compile, cpu.env.name = False, default.env.name
    assert cpu == default


def test_threads_setting():
    from omegaconf import OmegaConf

    import utils

    before = torch.get_num_threads()
    try:
        assert utils.set_threads(OmegaConf.create({"threads": 1})) == 1 == torch.get_num_threads()
        assert utils.set_threads(OmegaConf.create({"threads": None})) == 1  # null leaves it as it is
        with pytest.raises(ValueError, match="threads=0: expected a positive integer"):
            utils.set_threads(OmegaConf.create({"threads": 0}))
    finally:
        torch.set_num_threads(before)


def test_action_entropy_reads_a_run_and_its_shares_add_up(tmp_path):
    """benchmarks/action_entropy.py on a finished online run: the path KL and the actions' spread."""
    from tests.loaders import load_benchmark

    online.train(config(tmp_path / "run"))
    spread = load_benchmark("action_entropy")
    out = tmp_path / "actions.json"
    (row,) = spread.main([str(tmp_path / "run"), "--states", "3", "--recent", "200", "--samples", "300", "--out", str(out)])
    assert row["frames"] == 400 and row["sac_target_kl_uniform"] == pytest.approx(1 + 0.6931471805599453)
    for who in ("actor", "target_actor"):
        x = row[who]
        assert x["path_kl"] >= 0 and torch.isfinite(torch.tensor(x["path_kl"]))
        # one action dimension (Pendulum): an action on the edge is a corner, and the rest is inside
        assert x["corner_share"] == pytest.approx(x["edge_share"])
        assert x["interior_share"] == pytest.approx(1 - x["edge_share"])
        if x["interior_entropy"] is not None:
            assert x["interior_kl_uniform"] == pytest.approx(0.6931471805599453 - x["interior_entropy"])
    written = json.loads(out.read_text())
    assert written["runs"][0]["actor"] == row["actor"] and written["machine"]["torch"] == metadata.version("torch")


def test_checkpoint_probe_draws_the_own_chain_and_acts_as_the_run(tmp_path):
    """benchmarks/online_checkpoint_probe.py: the policy's a^n are its own chain's (drawn by hand
    with the same draws), the target actor acts as the run's acting module, and an online actor
    equal to its target gains nothing."""
    from torchrl.envs.utils import ExplorationType

    from tests.loaders import load_benchmark
    from torchrl_bdpo.envs import eval_seed, evaluate

    import utils

    probe = load_benchmark("online_checkpoint_probe")
    run = tmp_path / "run"
    online.train(config(run))
    out = tmp_path / "probe.json"
    (row,) = probe.main([str(run), "--episodes", "2", "--states", "64", "--recent", "200", "--out", str(out)])
    assert row["frames"] == 400 and json.loads(out.read_text())["runs"][0]["value_chain"] == row["value_chain"]
    for where in ("replay", "recent"):
        data, policy = row["value_chain"][where]["data"], row["value_chain"][where]["policy"]
        assert [v["rows"] for v in data.values()] == [v["rows"] for v in policy.values()] and sum(v["rows"] for v in data.values()) == 64
        for v in (*data.values(), *policy.values()):
            if v["rows"]:
                assert v["v_rms_error"] >= abs(v["v_bias"]) and all(np.isfinite(list(v.values())))

    cfg, loss, state = utils.load_online_run(run)  # the probe's loader: the checkpoint's weights at its eta
    assert float(loss.eta) == pytest.approx(state["eta_value"]) and state["frames"] == 400
    torch.testing.assert_close(dict(loss.state_dict()), dict(state["loss"]), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no config.yaml; pass the folder of a bdpo_online.py run"):
        utils.load_online_run(tmp_path)
    obs = torch.randn(6, 3)
    n = torch.tensor([1, 2, 3, 4, 5, 1])
    torch.manual_seed(3)
    got = probe.own_chain_steps(loss, obs, n)
    torch.manual_seed(3)
    noise = torch.randn(cfg.diffusion.num_steps + 1, 6, 1, 1)
    with loss.target_actor_network_params.to_module(loss.actor_network):
        path = loss.actor_network.sample_path(obs, num_samples=1, noise=noise)
    torch.testing.assert_close(got, torch.stack([path.actions[n[i], i, 0] for i in range(6)]), rtol=0, atol=0)

    # the target actor's best-of-K is the run's acting module's, at the same seed
    env = online.make_train_env(cfg.env.name, eval_seed(cfg.seed))
    torch.manual_seed(0)
    acting = loss.make_acting_module(num_candidates=cfg.eval.num_candidates, **utils.selection_kwargs(cfg))
    want = evaluate(env, acting, 2, cfg.eval.max_steps, ExplorationType.DETERMINISTIC, seed=eval_seed(cfg.seed))
    assert row["acting"]["target_actor/best_of_k"]["returns"] == pytest.approx(want.tolist(), abs=1e-4)
    for x in row["acting"].values():  # Pendulum's episodes run to the time limit: return = length x reward per step
        assert x["lengths"] == [cfg.eval.max_steps] * 2
        assert x["reward_per_step"] == pytest.approx(sum(x["returns"]) / sum(x["lengths"]), rel=1e-5)

    loss.actor_network_params.data.copy_(loss.target_actor_network_params.data)
    steps = probe.step_errors(loss, obs, probe.own_chain_steps(loss, obs, n), n, seed=5)
    assert all(v["online_actor_gain"] == 0 for v in steps.values() if v["rows"])

    # policy shift: the run's row reads the replay; against the target actor's own first sample
    # (the same draws) its distance and its Q gain are exactly 0
    for where in ("replay", "recent"):
        x = row["policy_shift"][where]
        assert x["to_replay"] > 0 and x["to_itself"] > 0 and len(x["mean_action_policy"]) == 1
        assert x["q_gain"] == pytest.approx(x["q_policy"] - x["q_replay"], abs=1e-4)
    torch.manual_seed(7)
    with loss.target_actor_network_params.to_module(loss.actor_network):
        own = loss.actor_network.sample_path(obs, num_samples=2).actions[0, :, 0]
    same = probe.shift_at(loss, obs, own, seed=7)
    assert same["to_replay"] == 0 and same["q_gain"] == 0 and same["critic_std_policy"] == same["critic_std_replay"] > 0
    assert same["to_itself"] > 0 and same["mean_action_policy"] == pytest.approx(own.mean(0).tolist())
