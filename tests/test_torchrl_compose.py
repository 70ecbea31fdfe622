"""BDPO's loss among TorchRL's own parts: target updaters, collectors, transforms."""

import pytest
import torch
from torchrl.envs import GymEnv, StepCounter, TransformedEnv
from torchrl.envs.transforms import ActionScaling
from torchrl.objectives import HardUpdate, SoftUpdate

from torchrl_bdpo.data import check_env_compatibility
from torchrl_bdpo.data.offline import DatasetInfo
from torchrl_bdpo.diffusion import DiffusionActor, EpsilonNetwork, make_qvalue_operator, make_schedule, make_value_operator
from torchrl_bdpo.objectives import BDPOLoss

pytestmark = pytest.mark.filterwarnings("ignore")
OBS, ACT = 3, 1  # Pendulum-v1


def make_loss():
    torch.manual_seed(0)
    # clip_denoised: actions stay in the box [-1, 1] (as in locomotion); unclipped, an untrained
    # actor proposes actions far outside it
    net = lambda: DiffusionActor(EpsilonNetwork(ACT, OBS, hidden=16, depth=2), make_schedule("vp", 3), clip_denoised=True)  # noqa: E731
    return BDPOLoss(
        net(),
        net(),
        make_value_operator(OBS, ACT, hidden=16, num_steps=3),
        make_qvalue_operator(OBS, ACT, hidden=16),
        eta=0.2,
        rho=1.0,
        num_qvalue_nets=2,
        num_samples=2,
    )


def pendulum():
    # Pendulum's actions are in [-2, 2]: the policy's [-1, 1] reaches it through ActionScaling
    return TransformedEnv(GymEnv("Pendulum-v1"), ActionScaling())


def target_leaves(loss):
    return {k: v for k, v in loss.state_dict(keep_vars=True).items() if k.startswith("target_")}


@pytest.mark.parametrize("updater", ["soft", "hard"])
def test_torchrl_target_updaters_work_after_loss_acting_and_collector_calls(updater):
    from torchrl.collectors import Collector

    loss = make_loss()
    env = pendulum()
    batch = env.rollout(6).reshape(-1)
    loss(batch)  # a loss call
    acting = loss.make_acting_module(num_candidates=3)
    acting(batch.select("observation").clone())  # an acting call
    collector = Collector(env, acting, frames_per_batch=8, total_frames=16)
    for data in collector:
        assert data["action"].abs().max() <= 1 + 1e-6  # the policy's scale; the env sees ±2
    collector.shutdown()
    assert not any(v.requires_grad for v in target_leaves(loss).values())
    up = SoftUpdate(loss, tau=0.25) if updater == "soft" else HardUpdate(loss, value_network_update_interval=1)
    with torch.no_grad():
        for p in loss.qvalue_network_params.values(True, True):
            p.add_(1.0)
    before = {k: v.detach().clone() for k, v in target_leaves(loss).items()}
    online = {k.replace("target_", "", 1): v.detach().clone() for k, v in loss.state_dict().items() if k.startswith("qvalue_network_params")}
    up.step()
    if updater == "hard":  # torchrl's HardUpdate copies on the interval-th call after the first
        up.step()
    for key, old in before.items():
        if key.startswith("target_qvalue_network_params"):
            new = loss.state_dict()[key]
            src = online[key.replace("target_", "", 1)]
            want = 0.75 * old + 0.25 * src if updater == "soft" else src
            torch.testing.assert_close(new, want)
    assert not any(v.requires_grad for v in target_leaves(loss).values())
    env.close()


def test_check_env_compatibility_counts_only_the_observation_on_a_step_counter_env():
    info = DatasetInfo(
        name="d", source="minari-local", num_transitions=1, num_episodes=1, observation_dim=3, action_dim=1, reward_mode="none", reward_scale=1.0
    )
    env = TransformedEnv(GymEnv("Pendulum-v1"), StepCounter())
    assert "step_count" in env.observation_spec.keys()
    check_env_compatibility(info, env)  # 3 = 3: step_count does not count
    wrong = DatasetInfo(**{**info.as_dict(), "observation_dim": 4})
    with pytest.raises(ValueError, match=r"observation dim 4 in the dataset vs 3 in the environment"):
        check_env_compatibility(wrong, env)
    env.close()


def test_collector_data_joins_the_offline_buffer_in_its_keys_and_scale(tmp_path, monkeypatch):
    from torchrl.collectors import Collector

    from torchrl_bdpo.data import TRANSITION_KEYS, OfflineToOnlineBuffer, make_offline_buffer, to_offline_layout
    from torchrl_bdpo.data.generate import GenerateConfig, generate

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    generate(GenerateConfig(levels=("random",), num_transitions=400, out_dir=str(tmp_path / "gen"), random_return_episodes=2, progress=False))
    offline = make_offline_buffer("generated/hopper/random-v0", batch_size=32)
    scale = offline.dataset_info.reward_scale
    assert scale != 1.0
    env = GymEnv("Hopper-v5")
    collector = Collector(env, None, frames_per_batch=50, total_frames=50)  # random actions
    batch = next(iter(collector))
    collector.shutdown()
    assert "collector" in batch.keys() and "episode" in offline[:].keys()
    rb = OfflineToOnlineBuffer(offline, online_capacity=1000, offline_fraction=0.5)
    rb.extend(batch)
    stored = rb.online_buffer[:]
    torch.testing.assert_close(stored["next", "reward"], batch["next", "reward"].reshape(-1, 1).float() * scale)
    mixed = rb.sample()
    assert mixed.batch_size == (32,)
    keys = set(mixed.keys(True, True))
    assert keys == set(TRANSITION_KEYS) == set(offline[:].exclude("episode", "index").keys(True, True))
    for key in keys:
        assert mixed[key].dtype == offline[:][key].dtype, key
    # the first 16 rows come from the offline data, the last 16 from the collector
    offline_obs = offline[:]["observation"]
    from_offline = [(offline_obs == row).all(-1).any() for row in mixed["observation"]]
    assert all(from_offline[:16]) and not any(from_offline[16:])
    # 1.0: continued offline training, the collector's data stored but never sampled
    only = OfflineToOnlineBuffer(offline, online_capacity=1000, offline_fraction=1.0)
    only.extend(batch)
    assert len(only.online_buffer) == batch.numel() and only.offline_fraction == 1.0
    for _ in range(3):
        drawn = only.sample()
        assert drawn.batch_size == (32,) and set(drawn.keys(True, True)) == keys
        assert all((offline_obs == row).all(-1).any() for row in drawn["observation"])
    for bad in (0, 0.0, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match=r"offline_fraction=.*expected a number in \(0, 1\]"):
            OfflineToOnlineBuffer(offline, online_capacity=10, offline_fraction=bad)
    # truncated is derived when the data lacks it, never zeroed
    no_trunc = batch.exclude(("next", "truncated"))
    out = to_offline_layout(no_trunc, scale)
    torch.testing.assert_close(out["next", "truncated"], (batch["next", "done"] & ~batch["next", "terminated"]).reshape(-1, 1))
    with pytest.raises(KeyError, match=r"no \[\('next', 'terminated'\)\] entries"):
        to_offline_layout(batch.exclude(("next", "terminated")))
    env.close()


def test_acting_module_needs_no_recurrent_transforms():
    """torchrl 0.14 warns that a Collector's env lacks ``InitTracker`` unless told
    ``auto_register_policy_transforms``; from 0.15 it appends it by default. The acting module is
    not recurrent: False collects as before, and True (0.15's default) adds only ``is_init``, which
    the acting module ignores and the offline layout leaves out."""
    import warnings

    from torchrl.collectors import Collector

    from torchrl_bdpo.data.online import TRANSITION_KEYS, to_offline_layout

    loss = make_loss()
    batches = {}
    for flag in (False, True):
        env = pendulum()
        env.set_seed(0)
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            collector = Collector(env, loss.make_acting_module(num_candidates=2), frames_per_batch=10, total_frames=10, auto_register_policy_transforms=flag)
            batches[flag] = next(iter(collector))
            collector.shutdown()
        assert not [w for w in caught if "missing transforms required by the policy" in str(w.message)]
    assert "is_init" not in batches[False].keys() and "is_init" in batches[True].keys()
    torch.testing.assert_close(batches[True]["action"], batches[False]["action"])  # the same draws
    laid_out = to_offline_layout(batches[True])
    assert set(laid_out.keys(True, True)) == set(TRANSITION_KEYS)
    assert torch.isfinite(loss(laid_out)["loss_qvalue"])


def test_bdpo_runs_under_torchrls_trainer_with_its_cadence():
    """A torchrl Trainer, a Collector on Pendulum (ActionScaling), and BDPO's stepper: the critics
    every step, the actor every 3rd after 2; the trainer averages the same keys every step."""
    from torchrl.collectors import Collector
    from torchrl.trainers import Trainer

    from torchrl_bdpo.training import BDPOOptimizationStepper, BDPOUpdate

    loss = make_loss()
    optimizers = {g: torch.optim.Adam(p, lr=1e-3) for g, p in BDPOUpdate.param_groups(loss).items()}
    update = BDPOUpdate(loss, optimizers, dict(zip(("critic", "actor", "behavior"), loss.make_target_updaters())), grad_clip=1.0)
    stepper = BDPOOptimizationStepper(update, warmup=2, actor_every=3)
    env = pendulum()
    collector = Collector(env, loss.make_acting_module(num_candidates=2), frames_per_batch=10, total_frames=40)
    actor_before = loss.actor_network_params.clone()
    trainer = Trainer(
        collector=collector,
        total_frames=40,
        frame_skip=1,
        optim_steps_per_batch=3,
        loss_module=loss,
        optimizer=None,
        optimization_stepper=stepper,
        progress_bar=False,
    )
    trainer.train()
    # 4 batches x 3 steps = 12 steps; actor steps at 2, 5, 8, 11
    assert stepper.steps == 12 and stepper.actor_steps == 4
    assert [s for s in range(12) if stepper.is_actor_step(s)] == [2, 5, 8, 11]
    assert not (loss.actor_network_params == actor_before).all()
    out = stepper.step(None, env.rollout(10))  # outside the trainer too
    assert set(out.keys()) == set(BDPOOptimizationStepper.KEYS) and torch.isfinite(out["loss_actor"])
    state = stepper.state_dict()
    fresh = BDPOOptimizationStepper(update, warmup=2, actor_every=3)
    fresh.load_state_dict(state)
    assert fresh.steps == 13 and fresh.actor_steps == stepper.actor_steps
    with pytest.raises(ValueError, match=r"actor_every=0: expected an integer >= 1"):
        BDPOOptimizationStepper(update, actor_every=0)
    collector.shutdown()
    env.close()
