"""D4RL-style datasets for Gymnasium MuJoCo tasks, made here with TorchRL's SAC.

Following D4RL's recipe (Fu et al. 2020), for one task:

- ``random``: a uniformly random policy;
- ``medium``: the first SAC policy whose deterministic evaluation return reaches
  ``medium_band[0]`` (a third, by default) of the expert return, rolled out stochastically;
- ``medium-replay``: every transition SAC collected until that policy (its replay buffer);
- ``expert``: the SAC policy after ``expert_frames`` environment steps, rolled out stochastically;
- ``medium-expert``: the medium and expert datasets together.

SAC is TorchRL's own: :class:`~torchrl.objectives.SACLoss`, a
:class:`~torchrl.collectors.Collector` and a ``TensorDictReplayBuffer``. The datasets are
written with ``minari.create_dataset_from_buffers`` (Minari's ``DataCollector`` needs jax)
under ids ``{prefix}/{task}/{level}-v0``, with ``ref_min_score`` the measured return of the
random policy and ``ref_max_score`` the measured return of our expert when the run trains
one, else the task's reference expert return (``expert_return``, D4RL's by default); the
dataset description says which.

Everything is resumable: a checkpoint (SAC, optimizers, replay buffer, collected levels,
RNG) is written every ``checkpoint_every`` frames, after each level and before the
``max_medium_frames`` error; a rerun with the same settings continues from it (only
``max_medium_frames`` and ``checkpoint_every`` may differ). See ``sota-implementations/bdpo/make_dataset.py``.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn

from torchrl_bdpo.checkpoint import load_checkpoint, remove_stale_tmp, save_checkpoint
from torchrl_bdpo.envs import make_env
from torchrl_bdpo.provenance import software_versions

LEVELS = ("random", "weak-medium", "medium", "medium-replay", "expert", "medium-expert")

# reference expert returns (D4RL's ref_max_score for the v2 tasks; Ant from D4RL's ant tasks)
EXPERT_RETURNS = {"Hopper": 3234.3, "HalfCheetah": 12135.0, "Walker2d": 4592.3, "Ant": 3879.7}


# settings a resumed run may change: budgets and bookkeeping, not what the data is made of
RESUMABLE_SETTINGS = ("max_medium_frames", "checkpoint_every")
# levels a resumed run may add: SAC goes on from its checkpoint (replay buffer included) to
# expert_frames, as one uninterrupted run would, and the run's datasets are written again
# with the expert's return as ref_max_score
ADDABLE_LEVELS = ("expert", "medium-expert")


@dataclass
class GenerateConfig:
    """Settings of one generation run (see the README's 'Generated datasets' for budgets)."""

    env_id: str = "Hopper-v5"
    levels: tuple = ("random", "medium", "medium-replay")
    num_transitions: int = 100_000  # per level (D4RL: 1M); medium-expert has twice as many
    seed: int = 0
    out_dir: str = "outputs/datasets/Hopper-v5"
    dataset_prefix: str = "generated"
    expert_return: float | None = None  # None: EXPERT_RETURNS for the task
    medium_band: tuple = (1 / 3, 1 / 2)
    weak_band: tuple = (0.2, 0.3)  # weak-medium: the first SAC policy past 1/5 of the expert return
    max_medium_frames: int = 400_000
    expert_frames: int = 1_000_000
    eval_every: int = 5_000
    eval_episodes: int = 5
    random_return_episodes: int = 20
    frames_per_batch: int = 1_000
    init_random_frames: int = 5_000
    utd_ratio: float = 1.0
    batch_size: int = 256
    hidden: int = 256
    lr: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005
    checkpoint_every: int = 20_000
    overwrite: bool = False  # replace datasets with the same ids
    progress: bool = True

    def validate(self) -> None:
        bad = [lv for lv in self.levels if lv not in LEVELS]
        if bad or not self.levels:
            raise ValueError(f"levels={list(self.levels)}: expected a non-empty subset of {list(LEVELS)}.")
        problems = []
        for name, low in (
            ("num_transitions", 1),
            ("seed", 0),
            ("max_medium_frames", 1),
            ("expert_frames", 1),
            ("eval_every", 1),
            ("eval_episodes", 1),
            ("random_return_episodes", 1),
            ("frames_per_batch", 1),
            ("init_random_frames", 0),
            ("batch_size", 1),
            ("hidden", 1),
            ("checkpoint_every", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(f"{name}={value!r}: expected an integer >= {low}")
        for name, lo, hi, lo_open in (("lr", 0, None, True), ("gamma", 0, 1, False), ("tau", 0, 1, True), ("utd_ratio", 0, None, True)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (value <= lo if lo_open else value < lo) or (hi is not None and value > hi):
                problems.append(f"{name}={value!r}: expected a number {'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else ""))
        if problems:
            raise ValueError("invalid generation settings:\n  " + "\n  ".join(problems))
        for name in ("medium_band", "weak_band"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name}={getattr(self, name)}: expected 0 < low <= high (fractions of the expert return).")
        if self.frames_per_batch < 1 or self.eval_every < self.frames_per_batch:
            raise ValueError(
                f"eval_every={self.eval_every}, frames_per_batch={self.frames_per_batch}: expected frames_per_batch >= 1 and eval_every >= frames_per_batch."
            )
        if self.expert_return is None and self.task not in EXPERT_RETURNS:
            raise ValueError(
                f"env_id={self.env_id!r}: no reference expert return is known for {self.task!r} (known: {sorted(EXPERT_RETURNS)}); pass expert_return=... ."
            )

    @property
    def task(self) -> str:
        return self.env_id.split("-v")[0]

    @property
    def reference_expert_return(self) -> float:
        return float(self.expert_return if self.expert_return is not None else EXPERT_RETURNS[self.task])

    def dataset_id(self, level: str) -> str:
        return f"{self.dataset_prefix}/{self.task.lower()}/{level}-v0"

    def fingerprint(self) -> dict:
        """The settings a checkpoint must agree on to be resumed (see :data:`RESUMABLE_SETTINGS`)."""
        d = asdict(self)
        for k in ("out_dir", "overwrite", "progress", "levels", *RESUMABLE_SETTINGS):
            d.pop(k)
        d["levels"] = sorted(self.levels)
        return json.loads(json.dumps(d, default=list))


# ----------------------------------------------------------------------------- env, SAC
def make_sac(env, hidden: int, gamma: float):
    from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator
    from torchrl.objectives import SACLoss

    obs_dim = env.observation_spec["observation"].shape[-1]
    act_dim = env.action_spec.shape[-1]
    low, high = env.action_spec.space.low, env.action_spec.space.high
    net = nn.Sequential(
        MLP(in_features=obs_dim, out_features=2 * act_dim, num_cells=[hidden, hidden], activation_class=nn.ReLU),
        NormalParamExtractor(scale_mapping="biased_softplus_1.0", scale_lb=1e-4),
    )
    actor = ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        spec=env.action_spec,
        distribution_class=TanhNormal,
        distribution_kwargs={"low": low, "high": high, "tanh_loc": False},
        return_log_prob=False,
    )
    qnet = MLP(in_features=obs_dim + act_dim, out_features=1, num_cells=[hidden, hidden], activation_class=nn.ReLU)
    qvalue = ValueOperator(qnet, in_keys=["observation", "action"])
    loss = SACLoss(actor, qvalue, num_qvalue_nets=2, loss_function="l2", delay_qvalue=True, action_spec=env.action_spec)
    loss.make_value_estimator(gamma=gamma)
    return actor, loss


# ----------------------------------------------------------------------------- episodes
class EpisodeSplitter:
    """Cuts a stream of collector batches (one env) into episodes; tags each transition's episode."""

    def __init__(self, next_id: int = 0) -> None:
        self.next_id = next_id
        self.current: list[TensorDict] = []

    def add(self, batch: TensorDict) -> tuple[TensorDict, list[TensorDict]]:
        """Returns the batch with an ``episode`` entry and the episodes it completed."""
        batch = batch.reshape(-1)
        done = batch["next", "done"].reshape(-1)
        ids = torch.empty(batch.shape[0], dtype=torch.int64)
        finished = []
        start = 0
        for end in (done.nonzero().squeeze(-1) + 1).tolist() + [batch.shape[0]]:
            if end <= start:
                continue
            ids[start:end] = self.next_id
            self.current.append(batch[start:end])
            if end <= batch.shape[0] and bool(done[end - 1]):
                finished.append(torch.cat(self.current))
                self.current = []
                self.next_id += 1
            start = end
        batch.set("episode", ids)
        return batch, finished

    def close(self) -> TensorDict | None:
        """The open episode, truncated where the stream stopped (None if there is none)."""
        if not self.current:
            return None
        ep = torch.cat(self.current)
        ep["next", "truncated"][-1] = True
        ep["next", "done"][-1] = True
        self.current = []
        self.next_id += 1
        return ep


def episodes_to_transitions(episodes: list[TensorDict], limit: int | None = None) -> TensorDict:
    """Concatenate episodes (the layout of ``make_offline_buffer``), cut to ``limit`` transitions.

    The episode that the cut goes through ends truncated.
    """
    rows, total = [], 0
    for i, ep in enumerate(episodes):
        if limit is not None and total >= limit:
            break
        if limit is not None and total + ep.shape[0] > limit:
            ep = ep[: limit - total].clone()
            ep["next", "truncated"][-1] = True
        rows.append(ep.set("episode", torch.full((ep.shape[0],), i, dtype=torch.int64)))
        total += ep.shape[0]
    return _as_dataset(torch.cat(rows))


def _as_dataset(td: TensorDict, episode: torch.Tensor | None = None) -> TensorDict:
    """Collected rows in ``make_offline_buffer``'s layout; a terminated step is never also truncated."""
    from torchrl_bdpo.data.offline import make_transitions

    return make_transitions(
        td["observation"],
        td["action"],
        td["next", "observation"],
        td["next", "reward"],
        td["next", "terminated"],
        td["next", "truncated"] & ~td["next", "terminated"],
        td["episode"] if episode is None else episode,
    )


def transitions_to_minari_episodes(td: TensorDict) -> list:
    """EpisodeBuffers (observations T + 1, actions, rewards, flags) from a transition TensorDict."""
    from minari.data_collector import EpisodeBuffer

    episodes = []
    ids = td["episode"]
    bounds = torch.nonzero(ids[1:] != ids[:-1]).squeeze(-1) + 1
    starts = [0, *bounds.tolist()]
    ends = [*bounds.tolist(), td.shape[0]]
    for k, (s, e) in enumerate(zip(starts, ends)):
        ep = td[s:e]
        obs = torch.cat([ep["observation"], ep["next", "observation"][-1:]]).numpy()
        episodes.append(
            EpisodeBuffer(
                id=k,
                observations=obs,
                actions=ep["action"].numpy(),
                rewards=ep["next", "reward"].reshape(-1).double().tolist(),
                terminations=ep["next", "terminated"].reshape(-1).tolist(),
                truncations=ep["next", "truncated"].reshape(-1).tolist(),
            )
        )
    return episodes


def mean_episode_return(episodes: list[TensorDict]) -> float:
    complete = [ep for ep in episodes if bool(ep["next", "done"][-1])]
    if not complete:
        return float("nan")
    return float(np.mean([ep["next", "reward"].sum().item() for ep in complete]))


# ----------------------------------------------------------------------------- generator
class DatasetGenerator:
    """Runs :class:`GenerateConfig`: random data, SAC to medium (and expert), rollouts, Minari files."""

    def __init__(self, cfg: GenerateConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt = self.out / "checkpoint.pt"
        self.logger = None
        self.timings: dict[str, float] = {}
        self.evals: list[tuple[int, float]] = []

    # -- state
    def _save(self, state: dict) -> None:
        save_checkpoint(self.ckpt, state)  # atomic, fsynced; TensorDicts stored as plain data

    def _log(self, name: str, value: float, step: int) -> None:
        if self.logger is None:
            from torchrl.record.loggers import get_logger

            self.logger = get_logger("csv", logger_name=str(self.out / "logs"), experiment_name="generate")
        if math.isfinite(value):
            self.logger.log_scalar(name, value, step=step)

    def _check_ids_free(self, skip=()) -> None:
        """Refuse, before any work, dataset ids that exist already (``skip``: levels this run wrote)."""
        from minari.storage import get_dataset_path

        for level in self.cfg.levels:
            if level in skip:
                continue
            path = Path(get_dataset_path(self.cfg.dataset_id(level)))
            if path.exists() and not self.cfg.overwrite:
                raise FileExistsError(
                    f"Minari dataset {self.cfg.dataset_id(level)!r} exists already ({path}). Pass "
                    f"overwrite=true to replace it, another dataset_prefix, or another seed/out_dir."
                )

    # -- collection
    def _rollout(self, env, policy, frames: int, desc: str, exploration=None) -> tuple[list[TensorDict], int]:
        """Episodes of ``policy`` (None: uniform random) totalling at least ``frames`` transitions.

        Returns ``(episodes, n_complete)``: the first ``n_complete`` ended by the environment,
        the last one may be cut where the frames ran out (it ends truncated).
        """
        from torchrl.collectors import Collector
        from torchrl.envs.utils import ExplorationType

        from tqdm import tqdm

        splitter = EpisodeSplitter()
        episodes: list[TensorDict] = []
        fpb = min(self.cfg.frames_per_batch, frames)
        collector = Collector(
            env, policy, frames_per_batch=fpb, total_frames=-1, exploration_type=exploration or ExplorationType.RANDOM, auto_register_policy_transforms=False
        )
        got = 0
        with tqdm(total=frames, desc=desc, disable=not self.cfg.progress) as bar:
            for batch in collector:
                _, done = splitter.add(batch.cpu())
                episodes += done
                got += batch.numel()
                bar.update(batch.numel())
                if got >= frames:
                    break
        collector.shutdown()
        n_complete = len(episodes)
        last = splitter.close()
        if last is not None:
            episodes.append(last)
        return episodes, n_complete

    def _evaluate(self, env, actor) -> float:
        from torchrl.envs.utils import ExplorationType, set_exploration_type

        returns = []
        with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
            for _ in range(self.cfg.eval_episodes):
                td = env.rollout(1000, actor, auto_reset=True, break_when_any_done=True)
                returns.append(td["next", "reward"].sum().item())
        return float(np.mean(returns))

    # -- main
    def run(self) -> dict:
        """The stages, each resumable: random level, SAC to the policies, their rollouts, the files."""
        cfg = self.cfg
        warnings.filterwarnings("ignore", message=".*No target network updater.*")
        start = time.perf_counter()
        state = self._open_state()
        self.timings = state.get("timings", {})
        self.evals = state.get("evals", [])
        torch.manual_seed(cfg.seed + state["frames"])
        np.random.seed(cfg.seed)
        levels = state["levels"]  # level -> transition TensorDict
        if "random_return" not in state:
            self._random_level(state, levels)
        if self._need("weak") or self._need("medium") or self._need("expert"):
            sac = self._make_sac(state)
            if self._sac_needed(state):
                self._train_sac(state, levels, sac)
            self._policy_rollouts(state, levels, sac)
        if "medium-expert" in cfg.levels and "medium-expert" not in levels:
            med, exp = levels["medium"], levels["expert"].clone()
            exp["episode"] = exp["episode"] + med["episode"].max() + 1
            levels["medium-expert"] = torch.cat([med, exp])
        return self._write(state, levels, time.perf_counter() - start)

    # --------------------------------------------------------------------- stages
    def _need(self, what: str) -> bool:
        """Whether the requested levels need the ``weak``, ``medium`` or ``expert`` SAC policy."""
        wanted = {"weak": ("weak-medium",), "medium": ("medium", "medium-replay", "medium-expert"), "expert": ("expert", "medium-expert")}[what]
        return any(level in self.cfg.levels for level in wanted)

    def _sac_needed(self, state: dict) -> bool:
        return any(self._need(w) and f"{w}_policy" not in state for w in ("weak", "medium", "expert"))

    def _open_state(self) -> dict:
        """A fresh state, or the checkpoint's (refused when made with other settings)."""
        cfg = self.cfg
        state = {"config": cfg.fingerprint(), "levels": {}, "frames": 0, "stage": "start"}
        remove_stale_tmp(self.ckpt)  # a write a crash cut short; the checkpoint before it is whole
        if not self.ckpt.exists():
            self._check_ids_free()
            return state
        state = load_checkpoint(self.ckpt)  # weights_only: a crafted file runs no code
        saved = {k: v for k, v in state["config"].items() if k not in RESUMABLE_SETTINGS}  # older checkpoints kept them
        current = cfg.fingerprint()
        added = sorted(set(current["levels"]) - set(saved["levels"]))
        if set(saved["levels"]) <= set(current["levels"]) and set(added) <= set(ADDABLE_LEVELS):
            saved = {**saved, "levels": current["levels"]}
        if saved != current:
            diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise ValueError(
                f"{self.ckpt} was written by a run with other settings (differing: {diff}). Use "
                f"the same settings to resume (a resumed run may add the levels {list(ADDABLE_LEVELS)} "
                f"and change {list(RESUMABLE_SETTINGS)}), or another out_dir for a new run."
            )
        if added:
            self._check_ids_free(skip=state.get("written", {}))
            if state["stage"] in ("policies done", "written"):  # SAC had stopped; older runs left so_far behind the total
                state.setdefault("timings", {})["sac_so_far_s"] = state["timings"].get("sac_total_s", 0.0)
            state["stage"] = "levels added"
        state["config"] = current
        print(f"resuming from {self.ckpt}: stage {state['stage']}, {state['frames']} SAC frames" + (f", adding {added}" if added else ""))
        return state

    def _random_level(self, state: dict, levels: dict) -> None:
        """1. The random policy: its dataset, and ``ref_min_score`` (whole episodes only)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        env = make_env(cfg.env_id, cfg.seed)
        frames = cfg.num_transitions if "random" in cfg.levels else 0
        episodes, n = self._rollout(env, None, frames, "random policy") if frames else ([], 0)
        complete = episodes[:n]
        while len(complete) < cfg.random_return_episodes:
            more, m = self._rollout(env, None, 1000, "random-policy returns")
            complete += more[:m]
        state["random_return"] = mean_episode_return(complete)
        if episodes:
            levels["random"] = episodes_to_transitions(episodes, cfg.num_transitions)
        env.close()
        self.timings["random_s"] = time.perf_counter() - t0
        state["stage"] = "random done"
        self._save({**state, "timings": self.timings, "evals": self.evals})

    def _lap(self) -> float:
        """The SAC clock: adds the time since the last lap to ``sac_so_far_s`` and returns it."""
        now = time.perf_counter()
        self.timings["sac_so_far_s"] = self.timings.get("sac_so_far_s", 0) + now - self._t0
        self._t0 = now
        return self.timings["sac_so_far_s"]

    def _make_sac(self, state: dict) -> SimpleNamespace:
        """TorchRL's SAC, its optimizers, replay buffer and envs, from the checkpoint when there is one."""
        from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
        from torchrl.objectives import SoftUpdate

        cfg = self.cfg
        self._t0 = time.perf_counter()
        env = make_env(cfg.env_id, cfg.seed + 1 + state["frames"])
        eval_env = make_env(cfg.env_id, cfg.seed + 10_000 + state["frames"])
        actor, loss = make_sac(env, cfg.hidden, cfg.gamma)
        optim = {
            "actor": torch.optim.Adam(loss.actor_network_params.parameters(), lr=cfg.lr),
            "qvalue": torch.optim.Adam(loss.qvalue_network_params.parameters(), lr=cfg.lr),
            "alpha": torch.optim.Adam([loss.log_alpha], lr=cfg.lr),
        }
        capacity = max(cfg.expert_frames if self._need("expert") else 0, cfg.max_medium_frames) + cfg.frames_per_batch
        rb = TensorDictReplayBuffer(storage=LazyTensorStorage(capacity), batch_size=cfg.batch_size)
        splitter = EpisodeSplitter()
        if "sac" in state:
            loss.load_state_dict(state["sac"]["loss"])
            for k, o in optim.items():
                o.load_state_dict(state["sac"]["optim"][k])
            stored = state["sac"]["buffer"]
            if stored is not None:
                rb.extend(stored)
            splitter.next_id = state["sac"]["next_episode"]
            torch.set_rng_state(state["sac"]["rng"])
        return SimpleNamespace(env=env, eval_env=eval_env, actor=actor, loss=loss, optim=optim, updater=SoftUpdate(loss, tau=cfg.tau), rb=rb, splitter=splitter)

    def _sac_update(self, sac: SimpleNamespace) -> dict:
        out = sac.loss(sac.rb.sample())
        total = out["loss_actor"] + out["loss_qvalue"] + out["loss_alpha"]
        for o in sac.optim.values():
            o.zero_grad(set_to_none=True)
        total.backward()
        for o in sac.optim.values():
            o.step()
        sac.updater.step()
        return {"total": total, "loss_qvalue": out["loss_qvalue"], "alpha": out["alpha"]}

    def _train_sac(self, state: dict, levels: dict, sac: SimpleNamespace) -> None:
        """2. SAC until the weak and medium policies (and the expert's frames), checkpointed."""
        from torchrl.collectors import Collector
        from tqdm import tqdm

        cfg = self.cfg
        need_weak, need_medium, need_expert = self._need("weak"), self._need("medium"), self._need("expert")
        target = cfg.expert_frames if need_expert else cfg.max_medium_frames
        lo, hi = (f * cfg.reference_expert_return for f in cfg.medium_band)
        weak_lo, weak_hi = (f * cfg.reference_expert_return for f in cfg.weak_band)
        frames = state["frames"]
        collector = Collector(
            sac.env,
            sac.actor,
            frames_per_batch=cfg.frames_per_batch,
            total_frames=-1,
            init_random_frames=max(0, cfg.init_random_frames - frames),
            auto_register_policy_transforms=False,
        )
        updates_per_batch = max(1, int(round(cfg.utd_ratio * cfg.frames_per_batch)))
        last_ckpt = frames

        def checkpoint() -> None:
            nonlocal last_ckpt
            self._checkpoint(state, levels, sac.loss, sac.optim, sac.rb, sac.splitter, frames)
            last_ckpt = frames

        bar = tqdm(total=target, initial=frames, desc=f"SAC on {cfg.env_id}", disable=not cfg.progress)
        for batch in collector:
            batch, _ = sac.splitter.add(batch.cpu())
            sac.rb.extend(batch)
            frames += batch.numel()
            bar.update(batch.numel())
            if frames >= cfg.init_random_frames:
                for _ in range(updates_per_batch):
                    out = self._sac_update(sac)
                if not torch.isfinite(out["total"]):
                    raise FloatingPointError(
                        f"SAC loss became {out['total'].item()} at frame {frames}; the last checkpoint "
                        f"({self.ckpt}, frame {last_ckpt}) is intact. Lower lr or check the task."
                    )
                self._log("sac/loss_qvalue", out["loss_qvalue"].item(), frames)
                self._log("sac/alpha", out["alpha"].item(), frames)
            collector.update_policy_weights_()
            if frames % cfg.eval_every < cfg.frames_per_batch and frames >= cfg.init_random_frames:
                ret = self._evaluate(sac.eval_env, sac.actor)
                self.evals.append((frames, ret))
                self._log("eval/return", ret, frames)
                bar.set_postfix(eval_return=f"{ret:.0f}", medium_at=f"{lo:.0f}")
                if need_weak and "weak_policy" not in state and ret >= weak_lo:
                    # the same SAC run, earlier: each level is a rollout of one of its policies
                    state["weak_policy"] = _policy_record(sac.actor, frames, ret, weak_lo, weak_hi, "weak-medium")
                    checkpoint()
                    if not need_medium and not need_expert:
                        break
                if need_medium and "medium_policy" not in state and ret >= lo:
                    state["medium_policy"] = _policy_record(sac.actor, frames, ret, lo, hi, "medium")
                    levels["medium-replay"] = _replay_transitions(sac.rb.storage[: len(sac.rb)])
                    self.timings["sac_to_medium_s"] = self._lap()
                    checkpoint()
                    if not need_expert and not (need_weak and "weak_policy" not in state):
                        break
            at_cap = ((need_medium and "medium_policy" not in state) or (need_weak and "weak_policy" not in state)) and frames >= cfg.max_medium_frames
            if not at_cap and need_expert and frames >= cfg.expert_frames:
                break
            # at the cap too: a rerun with a higher cap continues from here
            if frames - last_ckpt >= cfg.checkpoint_every or (at_cap and frames > last_ckpt):
                self._lap()
                checkpoint()
            if at_cap:
                best = max(r for _, r in self.evals) if self.evals else float("nan")
                raise RuntimeError(
                    f"SAC on {cfg.env_id} did not reach the medium level ({lo:.0f} = "
                    f"{cfg.medium_band[0]:.2f} x the expert return {cfg.reference_expert_return:.0f}) in "
                    f"{frames} frames (max_medium_frames={cfg.max_medium_frames}; best evaluation {best:.0f}). Rerun with a higher "
                    f"max_medium_frames to continue from the checkpoint at frame {frames} ({self.ckpt}), "
                    f"or start anew (another out_dir) with a lower medium_band / expert_return."
                )
        bar.close()
        collector.shutdown()
        self.timings["sac_total_s"] = self._lap()
        if need_expert and "expert_policy" not in state:
            state["expert_policy"] = {
                "params": TensorDict.from_module(sac.actor).clone(),
                "frames": frames,
                "eval_return": self._evaluate(sac.eval_env, sac.actor),
            }
        state["frames"] = frames

    def _policy_rollouts(self, state: dict, levels: dict, sac: SimpleNamespace) -> None:
        """3. Rollouts of the weak, medium and expert policies, then the stage's checkpoint."""
        cfg = self.cfg
        for name, key in (("weak-medium", "weak_policy"), ("medium", "medium_policy"), ("expert", "expert_policy")):
            wanted = name in cfg.levels or "medium-expert" in cfg.levels
            if key in state and wanted and name not in levels:
                t1 = time.perf_counter()
                state[key]["params"].to_module(sac.actor)
                env_r = make_env(cfg.env_id, cfg.seed + {"weak-medium": 40_000, "medium": 20_000, "expert": 30_000}[name])
                eps, _ = self._rollout(env_r, sac.actor, cfg.num_transitions, f"{name} policy rollouts")
                levels[name] = episodes_to_transitions(eps, cfg.num_transitions)
                self.timings[f"{name}_rollout_s"] = time.perf_counter() - t1
        sac.env.close()
        sac.eval_env.close()
        self._checkpoint(state, levels, sac.loss, sac.optim, None, sac.splitter, state["frames"], stage="policies done")

    def _checkpoint(self, state, levels, loss, optim, rb, splitter, frames, stage="sac") -> None:
        state["frames"] = frames
        state["stage"] = stage
        state["levels"] = levels
        state["sac"] = {
            "loss": loss.state_dict(),
            "optim": {k: o.state_dict() for k, o in optim.items()},
            "buffer": rb.storage[: len(rb)].clone() if rb is not None and len(rb) else state.get("sac", {}).get("buffer"),
            "next_episode": splitter.next_id,
            "rng": torch.get_rng_state(),
        }
        self._save({**state, "timings": self.timings, "evals": self.evals})

    def _write(self, state, levels, wall_s) -> dict:
        import minari
        from minari.storage import get_dataset_path

        from torchrl_bdpo.data.offline import episode_returns

        cfg = self.cfg
        ref_min = state["random_return"]
        expert = state.get("expert_policy")
        ref_max = expert["eval_return"] if expert else cfg.reference_expert_return
        ref_max_source = (
            "the deterministic evaluation return of this run's expert"
            if expert
            else f"the reference expert return for {cfg.task} ({cfg.reference_expert_return}, D4RL's unless set)"
        )
        written = {}
        for level in cfg.levels:
            td = levels[level]
            dataset_id = cfg.dataset_id(level)
            path = Path(get_dataset_path(dataset_id))
            if path.exists():
                if not cfg.overwrite and not state.get("written", {}).get(level):
                    raise FileExistsError(f"Minari dataset {dataset_id!r} exists already ({path}); pass overwrite=true.")
                minari.delete_dataset(dataset_id)
            desc = (
                f"D4RL-style '{level}' data for {cfg.env_id}, made by torchrl_bdpo with TorchRL's SAC "
                f"(seed {cfg.seed}). ref_min_score: mean return of a uniformly random policy; "
                f"ref_max_score: {ref_max_source}."
            )
            if level == "weak-medium" and "weak_policy" in state:
                desc += f" Weak-medium policy: eval return {state['weak_policy']['eval_return']:.1f} after {state['weak_policy']['frames']} SAC frames."
            elif "medium_policy" in state:
                desc += f" Medium policy: eval return {state['medium_policy']['eval_return']:.1f} after {state['medium_policy']['frames']} SAC frames."
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                minari.create_dataset_from_buffers(
                    dataset_id,
                    transitions_to_minari_episodes(td),
                    env=cfg.env_id,
                    algorithm_name=f"TorchRL SAC ({level})" if level != "random" else "uniform random policy",
                    author="torchrl_bdpo",
                    ref_min_score=float(ref_min),
                    ref_max_score=float(ref_max),
                    description=desc,
                )
            state.setdefault("written", {})[level] = True
            written[level] = {
                "dataset_id": dataset_id,
                "path": str(path),
                "transitions": int(td.shape[0]),
                "episodes": int(td["episode"].unique().numel()),
                "mean_episode_return": float(episode_returns(td).mean()),
            }
        summary = {
            "config": asdict(cfg),
            "ref_min_score": ref_min,
            "ref_max_score": ref_max,
            "ref_max_source": ref_max_source,
            "medium_policy": {k: v for k, v in state.get("medium_policy", {}).items() if k != "params"},
            "weak_policy": {k: v for k, v in state.get("weak_policy", {}).items() if k != "params"},
            "expert_policy": {k: v for k, v in (expert or {}).items() if k != "params"},
            "sac_frames": state["frames"],
            "timings_s": self.timings,
            "wall_time_this_call_s": wall_s,
            "evaluations": self.evals,
            "datasets": written,
            "software": software_versions(),  # a dataset is reproducible on the same software and CPU
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        self._plot(summary)
        state["stage"] = "written"
        self._save({**state, "timings": self.timings, "evals": self.evals})
        return summary

    def _plot(self, summary) -> None:
        if not self.evals:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        f, r = zip(*self.evals)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(f, r, marker=".", label="SAC evaluation return")
        lo, hi = (x * self.cfg.reference_expert_return for x in self.cfg.medium_band)
        ax.axhspan(lo, hi, color="C1", alpha=0.2, label="medium band")
        ax.axhline(summary["ref_min_score"], color="gray", ls="--", label="random policy")
        ax.set_xlabel("environment frames")
        ax.set_ylabel("return")
        ax.set_title(self.cfg.env_id)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(self.out / "sac_learning_curve.png", dpi=120)
        plt.close(fig)


def _policy_record(actor, frames: int, ret: float, lo: float, hi: float, level: str) -> dict:
    """The SAC policy that a level rolls out: its parameters and where it was taken."""
    if ret > hi:
        warnings.warn(
            f"the first policy past {lo:.0f} returned {ret:.0f} (> {hi:.0f}, the band's top); it is used "
            f"as the {level} policy. Evaluate more often (eval_every) for a closer one."
        )
    return {"params": TensorDict.from_module(actor).clone(), "frames": frames, "eval_return": ret, "in_band": ret <= hi}


def _replay_transitions(data: TensorDict) -> TensorDict:
    """The SAC replay buffer (in collection order) as dataset transitions; its open episode ends truncated."""
    data = data.clone()
    if not bool(data["next", "done"][-1]):
        data["next", "truncated"][-1] = True
    _, episode = torch.unique_consecutive(data["episode"], return_inverse=True)  # 0..E-1 in order
    return _as_dataset(data, episode)


def generate(cfg: GenerateConfig) -> dict:
    """Make the datasets ``cfg.levels`` for ``cfg.env_id``; returns the run summary (also in ``summary.json``)."""
    return DatasetGenerator(cfg).run()
