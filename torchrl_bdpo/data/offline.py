"""Offline datasets as TensorDictReplayBuffers: local Minari datasets, Minari ids and D4RL ids.

Every loaded transition is kept and checked (float32 data, actions clipped to
``±(1 - 1e-5)``, ``terminated`` apart from ``truncated``, rewards scaled by mode, and
the reference scores for normalised returns carried in ``buffer.dataset_info``), except
D4RL's time-limit transitions, whose next observation D4RL's files do not hold: those are
dropped, counted in ``dataset_info.dropped_transitions`` and warned about, as
``d4rl.qlearning_dataset`` (and the BDPO authors' loader) drops them.
TorchRL 0.14's ``MinariExperienceReplay`` is never used: its cache is written with
``memmap_like`` and comes back all zeros (docs/design.md section 6).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.data.replay_buffers.samplers import RandomSampler

REWARD_MODES = ("locomotion", "antmaze", "none")
ACTION_CLIP = 1 - 1e-5

# D4RL's published reference returns (d4rl/infos.py): the random and expert policies.
D4RL_REF_SCORES = {"halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3), "walker2d": (1.629008, 4592.3), "antmaze": (0.0, 1.0)}
D4RL_LOCOMOTION = tuple(
    f"{env}-{level}-v2" for env in ("halfcheetah", "hopper", "walker2d") for level in ("random", "medium", "medium-replay", "medium-expert", "expert")
)
D4RL_ANTMAZE = tuple(f"antmaze-{maze}-v2" for maze in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse"))
_D4RL_PATTERN = re.compile(r"^(halfcheetah|hopper|walker2d|antmaze)-[a-z-]+-v\d+$")
GENERATE_HINT = (
    "To make a D4RL-style dataset here instead, generate one for a Gymnasium MuJoCo task (see the README, section 'Generated datasets') and pass its path."
)


@dataclass
class DatasetInfo:
    """What a loaded offline dataset is, and how to normalise returns against it."""

    name: str
    source: str  # "minari-local", "minari", "d4rl"
    num_transitions: int
    num_episodes: int
    observation_dim: int
    action_dim: int
    reward_mode: str
    reward_scale: float
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    env_id: str | None = None
    # D4RL time-limit transitions left out: their next observation is not in the file
    dropped_transitions: int = 0
    # the dataset's action box when it is not [-1, 1]: its actions were rescaled to [-1, 1],
    # and a policy trained on them acts in the env through ActionScaling(loc, scale) (see
    # :meth:`action_scaling`); None: the actions were in [-1, 1] already
    action_low: list | None = None
    action_high: list | None = None

    def action_scaling(self):
        """``torchrl.envs.transforms.ActionScaling`` from the policy's [-1, 1] to the dataset's action
        box (append it to the evaluation env), or None when the box is [-1, 1]."""
        if self.action_low is None:
            return None
        from torchrl.envs.transforms import ActionScaling

        low, high = torch.tensor(self.action_low), torch.tensor(self.action_high)
        return ActionScaling(loc=(high + low) / 2, scale=(high - low) / 2)

    def normalized_score(self, returns):
        """``100 (R - R_random) / (R_expert - R_random)`` (D4RL's convention)."""
        if self.ref_min_score is None or self.ref_max_score is None:
            raise ValueError(
                f"dataset {self.name!r} carries no reference scores (ref_min_score / "
                f"ref_max_score): normalised scores are undefined. Generate the dataset with "
                f"reference scores, or report raw returns."
            )
        return 100.0 * (np.asarray(returns) - self.ref_min_score) / (self.ref_max_score - self.ref_min_score)

    def as_dict(self) -> dict:
        return asdict(self)


def _flatten_obs(obs) -> np.ndarray:
    if isinstance(obs, dict):  # goal-conditioned tasks: every part, in key order
        return np.concatenate([_flatten_obs(obs[k]) for k in sorted(obs)], -1)
    return np.asarray(obs, dtype=np.float32).reshape(len(obs), -1)


def transitions_from_episodes(episodes, name: str = "dataset") -> TensorDict:
    """One TensorDict of transitions from Minari-style episodes.

    Each episode has ``observations`` (T + 1 rows), ``actions``, ``rewards``, ``terminations``
    and ``truncations`` (T rows). Transition t is ``(o_t, a_t, r_t, o_{t+1}, terminated_t,
    truncated_t)``; every one is kept. Raises a ``ValueError`` that lists where NaN/inf are.
    """
    obs, next_obs, actions, rewards, terms, truncs, episode_ids = [], [], [], [], [], [], []
    for i, ep in enumerate(episodes):
        o = _flatten_obs(ep.observations if hasattr(ep, "observations") else ep["observations"])
        get = (lambda k: getattr(ep, k)) if hasattr(ep, "observations") else ep.__getitem__
        a = np.asarray(get("actions"), dtype=np.float32)
        a = a.reshape(len(a), -1)
        T = len(a)
        if o.shape[0] != T + 1:
            raise ValueError(
                f"{name}: episode {i} has {o.shape[0]} observations for {T} actions; expected "
                f"{T + 1} (the last observation closes the episode). The file is inconsistent: "
                f"regenerate or re-download it."
            )
        obs.append(o[:-1])
        next_obs.append(o[1:])
        actions.append(a)
        rewards.append(np.asarray(get("rewards"), dtype=np.float32).reshape(T, 1))
        terms.append(np.asarray(get("terminations"), dtype=bool).reshape(T, 1))
        truncs.append(np.asarray(get("truncations"), dtype=bool).reshape(T, 1))
        episode_ids.append(np.full((T,), i, dtype=np.int64))
    if not actions:
        raise ValueError(f"{name} holds no episodes: expected at least one transition.")
    cat = lambda xs: torch.from_numpy(np.concatenate(xs, 0))  # noqa: E731
    term, trunc = cat(terms), cat(truncs)
    td = make_transitions(cat(obs), cat(actions), cat(next_obs), cat(rewards), term, trunc, cat(episode_ids))
    check_finite_transitions(td, name)
    return td


def make_transitions(observation, action, next_observation, reward, terminated, truncated, episode=None) -> TensorDict:
    """The transition layout of every buffer here: float32 data, ``[n, 1]`` reward and flags, done = term | trunc."""
    terminated = terminated.reshape(-1, 1).bool()
    truncated = truncated.reshape(-1, 1).bool()
    fields = {
        "observation": observation.float(),
        "action": action.float(),
        "next": {
            "observation": next_observation.float(),
            "reward": reward.reshape(-1, 1).float(),
            "terminated": terminated,
            "truncated": truncated,
            "done": terminated | truncated,
        },
    }
    if episode is not None:
        fields["episode"] = episode
    return TensorDict(fields, batch_size=[terminated.shape[0]])


def check_finite_transitions(td: TensorDict, name: str = "dataset") -> None:
    """Raise a ``ValueError`` that counts the transitions with NaN/inf and says where they are."""
    bad = torch.zeros(td.batch_size, dtype=torch.bool)
    where = []
    for key in ("observation", "action", ("next", "observation"), ("next", "reward")):
        value = td.get(key)
        rows = ~torch.isfinite(value.reshape(value.shape[0], -1)).all(-1)
        if rows.any():
            where.append(f"{key!r} in {int(rows.sum())} row(s)")
        bad |= rows
    if bad.any():
        idx = bad.nonzero().squeeze(-1)
        first = idx[:5].tolist()
        episodes = td.get("episode")[idx].unique()[:5].tolist() if "episode" in td.keys() else "?"
        raise ValueError(
            f"{name}: {int(bad.sum())} of {td.shape[0]} transitions hold NaN or inf ({'; '.join(where)}); "
            f"first transition indices {first}, episodes {episodes}. Nothing is dropped silently: "
            f"remove or repair those episodes and load the dataset again."
        )


def episode_index(td: TensorDict) -> torch.Tensor:
    """The episode of every transition, as ``0..E-1`` (flattened).

    One rule for every helper here: with an ``episode`` entry, transitions that share an id
    form one episode, in storage order, wherever they are stored (interleaved episodes of
    parallel environments included); without one, an episode ends at each ``("next", "done")``.
    """
    if "episode" in td.keys():
        return torch.unique(td.get("episode").reshape(-1), return_inverse=True)[1]
    done = td.get(("next", "done")).reshape(-1).long()
    return torch.cat([done.new_zeros(1), done[:-1].cumsum(0)])


def episode_returns(td: TensorDict) -> torch.Tensor:
    """Undiscounted return of each episode (episodes as in :func:`episode_index`)."""
    reward = td.get(("next", "reward")).reshape(-1).double()
    ids = episode_index(td)
    return torch.zeros(int(ids.max()) + 1, dtype=torch.float64).index_add_(0, ids, reward)


def discounted_returns(td: TensorDict, gamma: float) -> torch.Tensor:
    """Monte Carlo return-to-go ``sum_k gamma^k r_{t+k}`` of every transition, within its episode.

    Episodes as in :func:`episode_index`; within one, transitions follow their storage order.
    Nothing is bootstrapped: for an episode cut by ``truncated`` (a time limit) it is a lower
    bound of the true value. A diagnostic for the learned Q (``Q(s, a)`` of a policy close to
    the data's should be near it), not a training target.
    """
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma={gamma!r}: expected a discount in [0, 1].")
    reward = td.get(("next", "reward")).reshape(-1).double()
    if gamma == 0:
        return reward.clone()
    ids = episode_index(td)
    order = torch.sort(ids, stable=True).indices  # each episode's transitions contiguous, in order
    reward, ids = reward[order], ids[order]
    starts = torch.cat([torch.ones(1, dtype=torch.bool), ids[1:] != ids[:-1]])
    bounds = starts.nonzero().squeeze(-1).tolist() + [reward.numel()]
    # blocks short enough that gamma^block stays far from float64 underflow
    block = max(1, min(4096, int(250 / max(-math.log10(gamma), 1e-12))))
    disc_full = gamma ** torch.arange(block, dtype=torch.float64)
    sorted_out = torch.empty_like(reward)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        carry = 0.0  # the return-to-go just after the block
        for end in range(hi, lo, -block):
            start = max(lo, end - block)
            disc = disc_full[: end - start]
            # G_j = sum_{k >= j} gamma^(k - j) r_k + gamma^(L - j) carry, by a reversed cumsum
            tail = (reward[start:end] * disc).flip(0).cumsum(0).flip(0) / disc
            sorted_out[start:end] = tail + carry * gamma * disc.flip(0)
            carry = float(sorted_out[start])
    return torch.empty_like(sorted_out).index_copy_(0, order, sorted_out)


def exact_return_mask(td: TensorDict, gamma: float, tol: float = 0.01) -> torch.Tensor:
    """Where :func:`discounted_returns` is the value of the step, not a lower bound of it.

    True for a transition whose episode ends in ``("next", "terminated")``, or whose episode
    goes on for more than ``horizon = ceil(log(tol) / log(gamma))`` steps from it, so that what
    a time limit (or the end of the data) cut off weighs less than ``tol`` of the return (at
    gamma 0.999 the horizon is 4603 steps: no step of a 1000-step episode cut by its time limit
    counts). Episodes as in :func:`episode_index`; without a ``terminated`` entry every episode
    counts as cut. Flattened, in storage order.
    """
    if not 0 < tol < 1:
        raise ValueError(f"tol={tol!r}: expected a fraction of the return in (0, 1).")
    ids = episode_index(td)
    n = ids.numel()
    order = torch.sort(ids, stable=True).indices
    sorted_ids = ids[order]
    lengths = torch.bincount(sorted_ids)
    first = torch.cumsum(lengths, 0) - lengths  # each episode's first position in sorted order
    remaining = lengths[sorted_ids] - (torch.arange(n) - first[sorted_ids])  # steps left, this one included
    last = first + lengths - 1
    if ("next", "terminated") in td.keys(True):
        ends_terminal = td.get(("next", "terminated")).reshape(-1).bool()[order][last]
    else:
        ends_terminal = torch.zeros(lengths.numel(), dtype=torch.bool)
    if 0 < gamma < 1:
        horizon = math.ceil(math.log(tol) / math.log(gamma))
        long_enough = remaining > horizon
    else:  # gamma 0: only the step's own reward; gamma 1: no horizon is long enough
        long_enough = torch.full((n,), gamma == 0)
    exact = ends_terminal[sorted_ids] | long_enough
    return torch.empty_like(exact).index_copy_(0, order, exact)


def reward_scale_for(td: TensorDict, mode: str) -> float:
    """``locomotion``: 1000 / (max - min episode return); ``antmaze``: 100; ``none``: 1."""
    if mode == "none":
        return 1.0
    if mode == "antmaze":
        return 100.0
    if mode == "locomotion":
        returns = episode_returns(td)
        spread = float(returns.max() - returns.min())
        if not spread > 0:
            raise ValueError(
                f"reward_mode='locomotion' divides by (max - min) episode return, but every one "
                f"of the {returns.numel()} episodes returns {float(returns[0]):.6g}. Use "
                f"reward_mode='none' for this dataset."
            )
        _warn_on_reward_spread(returns, spread)
        return 1000.0 / spread
    raise ValueError(f"reward_mode={mode!r}: expected one of {REWARD_MODES} or 'auto'.")


# the scale 1000 / (max - min) is a poor one when the spread is this small a part of the
# returns, or when one episode alone stretches it this many times over the others'
NARROW_SPREAD = 0.01
DOMINANT_EPISODE = 10.0


def _warn_on_reward_spread(returns: torch.Tensor, spread: float) -> None:
    """Warn when ``1000 / (max - min)`` episode return is a poor locomotion reward scale."""
    typical = float(returns.abs().mean())
    if spread < NARROW_SPREAD * typical:
        warnings.warn(
            f"reward_mode='locomotion': the episode returns spread over only {spread:.4g} "
            f"(min {float(returns.min()):.6g}, max {float(returns.max()):.6g}; {spread / typical:.2%} of "
            f"their mean size {typical:.4g}), so the scale 1000 / spread = {1000 / spread:.4g} inflates "
            f"every reward and Q's size against eta. Use reward_mode='none' or scale the rewards yourself.",
            stacklevel=3,
        )
        return
    if returns.numel() < 3:
        return
    order = returns.argsort()
    rest_without_max = float(returns[order[-2]] - returns[order[0]])
    rest_without_min = float(returns[order[-1]] - returns[order[1]])
    for rest, idx in ((rest_without_max, order[-1]), (rest_without_min, order[0])):
        if spread > DOMINANT_EPISODE * max(rest, 1e-12):
            warnings.warn(
                f"reward_mode='locomotion': episode {int(idx)} (return {float(returns[idx]):.6g}) alone "
                f"sets the spread {spread:.6g}, {spread / max(rest, 1e-12):.3g}x the other "
                f"{returns.numel() - 1} episodes' {rest:.6g}, so the scale 1000 / spread = "
                f"{1000 / spread:.4g} flattens the rest. Check that episode (an outlier reward?), "
                f"drop it, or use reward_mode='none'.",
                stacklevel=3,
            )
            return


# entries further than this outside [-1, 1] are data, not rounding: they are never clipped silently
_OUTSIDE_TOL = 1e-4


def _action_box(mds):
    """``(low, high)`` numpy arrays of a Minari dataset's Box action space, or None."""
    space = getattr(mds, "action_space", None)
    low, high = getattr(space, "low", None), getattr(space, "high", None)
    if low is None or high is None:
        return None
    low, high = np.asarray(low, dtype=np.float64).reshape(-1), np.asarray(high, dtype=np.float64).reshape(-1)
    if not (np.isfinite(low).all() and np.isfinite(high).all() and (high > low).all()):
        return None
    return low, high


def _check_dims_against_metadata(td: TensorDict, mds, name: str) -> None:
    """The loaded arrays' dims must be the dataset's declared observation and action spaces'."""
    import gymnasium as gym

    for key, attr in (("observation", "observation_space"), ("action", "action_space")):
        space = getattr(mds, attr, None)
        if space is None:
            continue
        try:
            declared = gym.spaces.flatdim(space)
        except Exception:  # a space without a flat size: nothing to compare
            continue
        found = td.get(key).shape[-1]
        if found != declared:
            raise ValueError(
                f"{name}: its {key}s have {found} dims but its metadata declares {attr} {space} "
                f"({declared} dims). The file is inconsistent: regenerate or re-download it."
            )


def _rescale_actions(td: TensorDict, box, name: str, action_clip) -> tuple[list | None, list | None]:
    """Map actions from the dataset's box to [-1, 1] when the box is not [-1, 1]; refuse data
    that clipping would change by more than rounding. Returns the box (or ``(None, None)``)."""
    action = td.get("action")
    low = high = None
    if box is not None and not (np.allclose(box[0], -1) and np.allclose(box[1], 1)):
        low, high = box
        lo_t, hi_t = torch.as_tensor(low, dtype=action.dtype), torch.as_tensor(high, dtype=action.dtype)
        action = 2 * (action - lo_t) / (hi_t - lo_t) - 1
        td.set("action", action)
        warnings.warn(
            f"{name}: its action space is [{low.min():g}, {high.max():g}], not [-1, 1]: actions were "
            f"rescaled to [-1, 1] (dataset_info.action_low / action_high keep the box; "
            f"dataset_info.action_scaling() maps the policy's actions back for the env).",
            stacklevel=4,
        )
    if action_clip is not None:
        outside = action.abs() > 1 + _OUTSIDE_TOL
        if outside.any():
            frac = float(outside.float().mean())
            where = "its declared action space" if box is not None else "[-1, 1] (the file declares no action space)"
            raise ValueError(
                f"{name}: {int(outside.sum())} of {outside.numel()} action entries ({frac:.1%}) lie outside "
                f"{where}, up to |a| = {float(action.abs().max()):.4g} after scaling; clipping them to "
                f"±{action_clip} would change the data. Fix the dataset's action space (its metadata), "
                f"rescale the actions to [-1, 1] yourself, or pass action_clip=None to keep them as they are."
            )
    return (None if low is None else low.tolist()), (None if high is None else high.tolist())


def _resolve_minari_path(path: Path) -> Path:
    data = path / "data" if (path / "data").is_dir() else path
    hdf5 = data / "main_data.hdf5"
    if not hdf5.exists():
        raise FileNotFoundError(
            f"{path} is not a Minari dataset: {hdf5} does not exist (and neither does a Minari "
            f"dataset with that id). Point to the dataset folder (the one holding 'data/'), "
            f"download it with `minari download <id>` where the network allows, or generate it "
            f"again. {GENERATE_HINT}"
        )
    return data


def _corrupted(data: Path, err: Exception) -> ValueError:
    return ValueError(
        f"could not read the Minari dataset at {data} ({type(err).__name__}: {err}). The file "
        f"{data / 'main_data.hdf5'} or its metadata is corrupted or incomplete: delete the "
        f"folder and download or generate the dataset again."
    )


def _open_minari(path: Path):
    import minari

    data = _resolve_minari_path(path)
    try:
        return minari.MinariDataset(str(data))
    except Exception as err:  # h5py/json errors name neither the file nor the fix
        raise _corrupted(data, err) from err


def _read_minari(mds, name: str) -> TensorDict:
    """Every transition of a MinariDataset; hdf5 read errors become a clear ``ValueError``."""
    try:
        return transitions_from_episodes(mds.iterate_episodes(), name)
    except (OSError, KeyError, RuntimeError) as err:
        raise _corrupted(Path(mds.storage.data_path), err) from err


def _load_minari_id(dataset_id: str, download: bool):
    import minari
    from minari.storage import get_dataset_path

    local = Path(get_dataset_path(dataset_id))
    if (local / "data" / "main_data.hdf5").exists():
        return _open_minari(local)
    if not download:
        raise FileNotFoundError(
            f"Minari dataset {dataset_id!r} was not found locally (looked in {local}; set "
            f"MINARI_DATASETS_PATH to search elsewhere) and download=False. Download it where "
            f"the network allows with `minari download {dataset_id}` (or download=True). "
            f"{GENERATE_HINT}"
        )
    try:
        return minari.load_dataset(dataset_id, download=True)
    except Exception as err:
        raise FileNotFoundError(
            f"Minari dataset {dataset_id!r} is not stored locally (looked in {local}) and could "
            f"not be downloaded ({type(err).__name__}: {err}). Check the id (`minari list remote` "
            f"lists them) and the network, or copy the dataset into {local}. {GENERATE_HINT}"
        ) from err


def _minari_ref_scores(dataset) -> tuple[float | None, float | None, str | None]:
    storage = dataset.storage
    meta = getattr(storage, "metadata", {}) or {}
    env_id = None
    spec = getattr(dataset, "env_spec", None)
    if spec is not None:
        env_id = spec.id
    return meta.get("ref_min_score"), meta.get("ref_max_score"), env_id


def dataset_env_id(dataset: str | os.PathLike, *, download: bool = True) -> str | None:
    """The environment id a dataset names, read without loading its transitions.

    A local Minari dataset or a Minari id: its metadata's ``env_spec`` (a Minari id not stored
    locally is downloaded when ``download``); a D4RL id: the id itself (``"hopper-medium-v2"``,
    which :func:`torchrl_bdpo.envs.eval_env_id` maps to ``Hopper-v5``). ``None`` where the
    metadata names no environment. A name that is none of these raises the error that
    :func:`make_offline_buffer` gives for it.
    """
    name = str(dataset)
    source = _dataset_source(name)
    if source == "d4rl":
        return name
    mds = _open_minari(Path(name)) if source == "minari-local" else _load_minari_id(name, download)
    return _minari_ref_scores(mds)[2]


def _dataset_source(name: str) -> str:
    """Which kind of dataset ``name`` is: ``"minari-local"`` (an existing path), ``"d4rl"`` (a
    D4RL id) or ``"minari"`` (a Minari id); a clear error for a missing path or any other name."""
    if os.path.exists(name):
        return "minari-local"
    if os.path.isabs(name) or name.startswith((".", "~")):
        raise FileNotFoundError(
            f"dataset path {name!r} does not exist (a path, not a Minari id: those look like "
            f"'mujoco/hopper/medium-v0'). Check the path; it must be the dataset folder holding 'data/'."
        )
    if _D4RL_PATTERN.match(name):
        return "d4rl"
    if "/" in name:
        return "minari"
    raise FileNotFoundError(
        f"dataset {name!r} is neither an existing path, a D4RL id (e.g. 'hopper-medium-v2'; "
        f"known: {', '.join(D4RL_LOCOMOTION[:3])}, ..., {', '.join(D4RL_ANTMAZE[:2])}, ...) nor "
        f"a Minari id (namespace/.../name-vN, e.g. 'mujoco/hopper/medium-v0'). {GENERATE_HINT}"
    )


def load_d4rl_transitions(dataset_id: str, **kwargs) -> tuple[TensorDict, int]:
    """D4RL transitions through torchrl's ``D4RLExperienceReplay(direct_download=True)``.

    Returns ``(transitions, dropped)``. D4RL's files hold no next observations: torchrl takes
    the next row's observation, which at a time-limit transition (``truncated``) is the
    first observation of the next episode, not the state the step reached. Those transitions
    are dropped (``dropped`` counts them), as ``d4rl.qlearning_dataset`` and the BDPO authors'
    loader do; found as the truncated rows whose next observation equals the following row's
    observation. The episodes stay as the file has them (an ``episode`` entry).
    """
    from torchrl.data.datasets import D4RLExperienceReplay

    try:
        rb = D4RLExperienceReplay(dataset_id, batch_size=1, direct_download=True, **kwargs)
    except Exception as err:
        raise FileNotFoundError(
            f"D4RL dataset {dataset_id!r} could not be loaded ({type(err).__name__}: {err}). D4RL "
            f"files are downloaded on first use and cached by torchrl: check the id and the "
            f"network. {GENERATE_HINT}"
        ) from err
    data = rb[:]
    term = data.get(("next", "terminated"))
    trunc = data.get(("next", "truncated"), None)
    td = make_transitions(
        data.get("observation"),
        data.get("action"),
        data.get(("next", "observation")),
        data.get(("next", "reward")),
        term,
        torch.zeros_like(term) if trunc is None else trunc,
    )
    td.set("episode", episode_index(td))  # before any row goes: the file's episodes
    obs, next_obs = td.get("observation"), td.get(("next", "observation"))
    shifted = torch.zeros(td.shape[0], dtype=torch.bool)
    shifted[:-1] = td.get(("next", "truncated")).reshape(-1)[:-1] & (next_obs[:-1] == obs[1:]).all(-1)
    dropped = int(shifted.sum())
    if dropped:
        warnings.warn(
            f"{dataset_id}: dropped {dropped} of {td.shape[0]} transitions, the time-limit ones: D4RL "
            f"does not store their next observation (the next row starts a new episode), as "
            f"d4rl.qlearning_dataset drops them. buffer.dataset_info.dropped_transitions counts them.",
            stacklevel=3,
        )
        td = td[~shifted]
    check_finite_transitions(td, dataset_id)
    return td, dropped


def make_offline_buffer(
    dataset: str | os.PathLike,
    batch_size: int,
    *,
    reward_mode: str = "auto",
    action_clip: float = ACTION_CLIP,
    download: bool = True,
    device: str | torch.device = "cpu",
    sampler=None,
) -> TensorDictReplayBuffer:
    """A ``TensorDictReplayBuffer`` of every transition of an offline dataset.

    Args:
        dataset: the path of a local Minari dataset (the folder holding ``data/``), a Minari
            id (``"mujoco/hopper/medium-v0"``: local if stored, downloaded otherwise when
            ``download``), or a D4RL id (``"hopper-medium-v2"``, via torchrl's
            ``D4RLExperienceReplay`` with ``direct_download=True``).
        batch_size: transitions per ``sample()``.

    Keyword Args:
        reward_mode: ``"locomotion"`` (x 1000 / (max - min episode return)), ``"antmaze"``
            (x 100), ``"none"``, or ``"auto"`` (antmaze for antmaze ids, else locomotion).
        action_clip: actions are clipped to ``±action_clip``. Defaults to ``1 - 1e-5``.
        download: allow downloading a Minari id that is not stored locally.
        device: storage device.
        sampler: the buffer's TorchRL sampler. Defaults to ``RandomSampler()`` (i.i.d. batches);
            ``SamplerWithoutReplacement()`` goes through the data epoch by epoch in a shuffled
            order, as the BDPO authors' loader does.

    The buffer's ``dataset_info`` (:class:`DatasetInfo`) holds the counts, the reward
    scale and the reference scores (D4RL's published ones, or the Minari metadata).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive integer.")
    name = str(dataset)
    ref_min = ref_max = env_id = None
    dropped = 0
    mds = None
    source = _dataset_source(name)
    if source == "d4rl":
        td, dropped = load_d4rl_transitions(name)
        ref_min, ref_max = D4RL_REF_SCORES[name.split("-")[0]]
        env_id = name
    else:
        mds = _open_minari(Path(name)) if source == "minari-local" else _load_minari_id(name, download)
        td = _read_minari(mds, name)
        ref_min, ref_max, env_id = _minari_ref_scores(mds)
    if reward_mode == "auto":
        reward_mode = "antmaze" if "antmaze" in name else "locomotion"
    scale = reward_scale_for(td, reward_mode)
    td.set(("next", "reward"), td.get(("next", "reward")) * scale)
    action_low = action_high = None
    if mds is not None:
        _check_dims_against_metadata(td, mds, name)
    if action_clip is not None or mds is not None:
        action_low, action_high = _rescale_actions(td, None if mds is None else _action_box(mds), name, action_clip)
    if action_clip is not None:
        td.set("action", td.get("action").clamp(-action_clip, action_clip))
    info = DatasetInfo(
        name=name,
        source=source,
        num_transitions=td.shape[0],
        num_episodes=int(episode_returns(td).numel()),
        observation_dim=td.get("observation").shape[-1],
        action_dim=td.get("action").shape[-1],
        reward_mode=reward_mode,
        reward_scale=scale,
        ref_min_score=None if ref_min is None else float(ref_min),
        ref_max_score=None if ref_max is None else float(ref_max),
        env_id=env_id,
        dropped_transitions=dropped,
        action_low=action_low,
        action_high=action_high,
    )
    buffer = TensorDictReplayBuffer(
        storage=LazyTensorStorage(td.shape[0], device=device), sampler=RandomSampler() if sampler is None else sampler, batch_size=batch_size
    )
    buffer.extend(td)
    buffer.dataset_info = info
    return buffer


def check_env_compatibility(info: DatasetInfo, env, observation_keys=("observation",)) -> None:
    """Raise a ``ValueError`` before training when the dataset and the environment disagree on dims.

    ``env`` is a TorchRL env (specs) or a Gymnasium env (spaces). Of a TorchRL env, the
    ``observation_keys`` entries count (the dataset's observation), not what transforms add
    beside them (``StepCounter``'s ``step_count``, ``InitTracker``'s ``is_init``); an env
    without those keys counts every observation leaf.
    """
    if hasattr(env, "observation_spec"):
        obs_spec = env.observation_spec
        present = [k for k in observation_keys if k in obs_spec.keys(True, True)]
        specs = [obs_spec[k] for k in present] if present else list(obs_spec.values(True, True))
        obs_dim = sum(int(np.prod(spec.shape[len(env.batch_size) :])) for spec in specs)
        act_dim = int(np.prod(env.action_spec.shape[len(env.batch_size) :]))
    else:
        obs_dim = int(np.prod(env.observation_space.shape)) if env.observation_space.shape else 0
        act_dim = int(np.prod(env.action_space.shape))
    problems = []
    if obs_dim != info.observation_dim:
        problems.append(f"observation dim {info.observation_dim} in the dataset vs {obs_dim} in the environment")
    if act_dim != info.action_dim:
        problems.append(f"action dim {info.action_dim} in the dataset vs {act_dim} in the environment")
    if problems:
        raise ValueError(
            f"dataset {info.name!r} does not match the evaluation environment: {'; '.join(problems)}. "
            f"Evaluate on the task the data came from (dataset env: {info.env_id!r})."
        )
