"""Gymnasium MuJoCo environments as TorchRL envs, and the evaluation of a policy in them.

Shared by the offline script, the dataset generator and the offline peers' harness
(``benchmarks/offline_peers.py``), so that every method is evaluated the same way.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

__all__ = [
    "D4RL_EVAL_ENVS",
    "action_scaling_for",
    "check_unit_action_box",
    "episode_stats",
    "eval_env_id",
    "eval_seed",
    "evaluate",
    "make_env",
    "make_eval_env",
]

# D4RL v2 datasets were recorded in the mujoco-py v3 tasks; Gymnasium's v5 tasks have the
# same observation and action spaces and are what evaluates them here.
D4RL_EVAL_ENVS = {"halfcheetah": "HalfCheetah-v5", "hopper": "Hopper-v5", "walker2d": "Walker2d-v5"}


EVAL_SEED_OFFSET = 12345


def eval_seed(seed: int) -> int:
    """The evaluation env's seed for a run of seed ``seed``: apart from the training env's, and
    the same for every method and probe that evaluates that run (so all start from the same states)."""
    return int(seed) + EVAL_SEED_OFFSET


def make_env(env_id: str, seed: int | None = None):
    """A TorchRL ``GymEnv`` with float32 observations (Gymnasium MuJoCo returns float64)."""
    from torchrl.envs import DoubleToFloat, GymEnv, TransformedEnv

    env = TransformedEnv(GymEnv(env_id), DoubleToFloat())
    if seed is not None:
        env.set_seed(seed)
    return env


def _action_box(env):
    spec = env.action_spec_unbatched if hasattr(env, "action_spec_unbatched") else env.action_spec
    space = getattr(spec, "space", None)
    if space is None or not hasattr(space, "low"):
        raise ValueError(f"the env's action spec is {type(spec).__name__}: expected a bounded continuous box.")
    low, high = space.low.float(), space.high.float()
    if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise ValueError(
            f"the env's action box [{low.tolist()}, {high.tolist()}] is unbounded: diffusion policies here act in [-1, 1]; give the env a bounded action space."
        )
    return low, high


def action_scaling_for(env):
    """torchrl's ``ActionScaling`` from the policy's [-1, 1] to ``env``'s action box, or None when
    the box is [-1, 1] already. ``TransformedEnv(env, action_scaling_for(env))`` then takes
    [-1, 1] actions (its ``action_spec`` says so)."""
    low, high = _action_box(env)
    if torch.allclose(low, -torch.ones_like(low)) and torch.allclose(high, torch.ones_like(high)):
        return None
    from torchrl.envs.transforms import ActionScaling

    return ActionScaling(loc=(high + low) / 2, scale=(high - low) / 2)


def check_unit_action_box(env, what: str = "the policy") -> None:
    """A ``ValueError`` unless ``env`` takes actions in [-1, 1] (e.g. after ``ActionScaling``).

    The diffusion policies clip their samples to [-1, 1], and the uniform reference is uniform
    on that box: on Pendulum's ±2 the policy would never reach half the range, and eta would
    weigh the KL to a distribution on the wrong box.
    """
    low, high = _action_box(env)
    if not (torch.allclose(low, -torch.ones_like(low)) and torch.allclose(high, torch.ones_like(high))):
        raise ValueError(
            f"the env's action box is low={low.tolist()}, high={high.tolist()}, but {what} acts in [-1, 1]. "
            f"Scale it: env = TransformedEnv(env, torchrl_bdpo.envs.action_scaling_for(env)) (torchrl's "
            f"ActionScaling maps [-1, 1] onto the box)."
        )


def eval_env_id(info, override: str | None = None) -> str:
    """The Gymnasium id that evaluates a dataset (``info``: its ``DatasetInfo``).

    ``override`` wins; a D4RL v2 locomotion dataset maps to the v5 task; otherwise the
    dataset's own ``env_id``.
    """
    if override:
        return override
    name = str(info.env_id or "")
    prefix = name.split("-")[0]
    if info.source == "d4rl" and prefix in D4RL_EVAL_ENVS:
        return D4RL_EVAL_ENVS[prefix]
    if info.env_id:
        return info.env_id
    raise ValueError(
        f"dataset {info.name!r} names no environment to evaluate in; set env.eval_env=<Gymnasium id> or eval.episodes=0 to train without evaluation."
    )


def make_eval_env(env_id: str, num_envs: int, seed: int, device: torch.device, action_scaling=None):
    """The evaluation env seeded with ``seed``, its outputs on ``device`` (the policy's: on a GPU run the Gymnasium
    envs step on the CPU, and their observations reach the policy on the GPU).

    ``action_scaling``: a transform from the policy's [-1, 1] actions to the env's (the
    dataset's ``dataset_info.action_scaling()`` when its action box is not [-1, 1]).
    """
    from torchrl.envs import ParallelEnv

    make = partial(make_env, env_id)
    try:
        env = ParallelEnv(num_envs, make, device=device) if num_envs > 1 else make().to(device)
    except Exception as err:
        raise RuntimeError(
            f"could not build the evaluation environment {env_id!r} ({type(err).__name__}: {err}). Install "
            f"its package (gymnasium[mujoco]; gymnasium-robotics for antmaze), set env.eval_env, or "
            f"eval.episodes=0."
        ) from err
    if action_scaling is not None:
        from torchrl.envs import TransformedEnv

        env = TransformedEnv(env, action_scaling)
    env.set_seed(seed)
    return env


def evaluate(env, policy, episodes: int, max_steps: int, exploration, keep_episodes: bool = False, seed: int | None = None):
    """Returns of ``episodes`` first episodes (each env counts the rewards up to its first done).

    ``seed``: reseed ``env`` first (``env.set_seed(seed)``), so that every call starts from the
    same initial states: the policy, its probes and the peers at every evaluation of a run, and
    a resumed run's evaluations as an uninterrupted run's. Without it the env's random stream
    continues from the previous call. The policy's own sampling draws from torch's generator.

    ``keep_episodes=True`` also returns each episode's steps, a TensorDict with
    ``observation``, ``action``, ``("next", "reward")``, ``("next", "terminated")`` and
    ``("next", "observation")`` up to and including its first done: ``(returns, episodes)``.
    """
    from torchrl.envs.utils import set_exploration_type

    if seed is not None:
        env.set_seed(seed)
    n_envs = env.batch_size.numel() if env.batch_size else 1
    returns, kept = [], []
    with set_exploration_type(exploration), torch.no_grad():
        while len(returns) < episodes:
            td = env.rollout(max_steps, policy, break_when_any_done=False, break_when_all_done=True)
            td = td.reshape(n_envs, -1) if env.batch_size else td.unsqueeze(0)
            reward = td["next", "reward"].reshape(n_envs, -1)
            done = td["next", "done"].reshape(n_envs, -1).long()
            before_first_done = (done.cumsum(-1) - done) == 0  # steps up to and including the first done
            returns += (reward * before_first_done).sum(-1).tolist()
            if keep_episodes:
                kept += [
                    td[i][before_first_done[i]].select("observation", "action", ("next", "reward"), ("next", "terminated"), ("next", "observation")).cpu()
                    for i in range(n_envs)
                ]
    returns = np.asarray(returns[:episodes])
    return (returns, kept[:episodes]) if keep_episodes else returns


def episode_stats(episodes, gamma: float) -> dict:
    """Mean length and mean discounted return (raw rewards, from the first step) of kept episodes.

    ``episodes``: what :func:`evaluate` keeps (``keep_episodes=True``). Next to the undiscounted
    return these tell a policy that gains reward early and falls later (a longer ``length``
    matters to the return, hardly to the discounted return) from one that is simply worse.
    """
    if not episodes:
        raise ValueError("episodes is empty: evaluate with keep_episodes=True and at least one episode.")
    lengths, discounted = [], []
    for ep in episodes:
        reward = ep["next", "reward"].reshape(-1).double()
        lengths.append(reward.numel())
        discounted.append(float((reward * gamma ** torch.arange(reward.numel(), dtype=torch.float64)).sum()))
    return {"length": float(np.mean(lengths)), "discounted_return": float(np.mean(discounted))}
