"""Online and offline-to-online BDPO with a TorchRL Collector.

    python sota-implementations/bdpo/bdpo_online.py                               # MaxEnt RL, Pendulum-v1
    python sota-implementations/bdpo/bdpo_online.py env.name=Hopper-v5 collector.total_frames=50000 online_budget=cpu
    python sota-implementations/bdpo/bdpo_online.py mode=offline2online offline.run=<offline run folder>
    python sota-implementations/bdpo/bdpo_online.py mode=offline2online \
        'offline.overrides=["task=generated-hopper-medium","budget=cpu"]'         # phases A and B first

``mode=online``: maximum-entropy RL. The reference is the uniform policy on the action box
(``reference=uniform``; docs/design.md section 5) and eta is the temperature, fixed or automatic
(``auto_eta.enabled``: :class:`~torchrl_bdpo.training.EtaLagrangian` toward
``auto_eta.target_kl_per_dim`` nats of path KL per action dimension). Before its first update the
fresh actor is fitted to the reference on the replay's states (``reference_fit``,
:func:`~torchrl_bdpo.training.fit_actor_to_reference`), so that it starts where the regulariser
pulls it instead of at a random network's near-bang-bang actions.

``mode=offline2online``: starts from an offline BDPO run after phase B (``offline.run``, its
``config.yaml`` and ``checkpoint.pt``; or ``offline.overrides`` runs bdpo_offline.py first into
``<output_dir>/offline``), with the offline run's networks and loss settings. Each batch takes
``replay.offline_fraction`` of the offline data and the rest from the online replay, whose
rewards are scaled as the dataset's (``replay.offline_fraction=1``: the offline data only, continued
offline training with the same updates and rates: the baseline of
``benchmarks/offline_to_online.py``). The reference is the dataset behavior, frozen
(``reference=behavior``) or trained on the replay (``reference=behavior_train``); eta may move
linearly to ``anneal_eta.final`` over ``anneal_eta.frames``.

Both: a TorchRL ``Collector`` (``init_random_frames`` of uniform actions first; then one sample
of the target actor per step, ``ExplorationType.RANDOM``), ``ActionScaling`` when the env's
action box is not [-1, 1], ``optim.utd_ratio`` updates per frame (critics every update, the
actor every ``optim.actor_every``-th after ``optim.warmup``), evaluations every
``eval.interval`` frames with best-of-K by Q (``DETERMINISTIC``) and with one sample
(``RANDOM``), TorchRL loggers, tqdm, atomic checkpoints every ``checkpoint.interval`` frames
(replay buffer, eta and RNG included; a resume restarts the env's episode), ``summary.json``
(``wall_time_s`` and ``time_s``, the run's seconds in the collector, i.e. acting and env steps,
in the updates and in the evaluations, both summed over resumes) and ``learning_curve.png`` in the output folder.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts' utils
from utils import (  # noqa: E402
    acting_rule,
    check_state_before_saving,
    hydra_main,
    load_checkpoint,
    log_scalars,
    make_bdpo_loss,
    make_logger,
    make_training,
    plot_probe_returns,
    policy_value_probe,
    run_start,
    save_checkpoint,
    selection_kwargs,
    start_run,
    train_scalars,
    train_step,
    training_state,
    truncate_csv_logs,
    write_summary,
)

from torchrl_bdpo import checkpoint as checkpoint_io  # noqa: E402
from torchrl_bdpo.data import OfflineToOnlineBuffer, check_env_compatibility, make_offline_buffer, to_offline_layout  # noqa: E402
from torchrl_bdpo.data.online import check_offline_fraction  # noqa: E402
from torchrl_bdpo.envs import action_scaling_for, check_unit_action_box, eval_env_id, eval_seed, evaluate, make_env  # noqa: E402
from torchrl_bdpo.training import EtaLagrangian  # noqa: E402

MODES = ("online", "offline2online")
REFERENCES = {"online": ("uniform", "gaussian"), "offline2online": ("behavior", "behavior_train")}
# the model blocks an offline2online run takes from its offline run
MODEL_BLOCKS = ("diffusion", "critic", "loss")
# optimiser settings an offline2online run takes from its offline run where its config says null
INHERITED_OPTIM = ("batch_size", "actor_every", "critic_lr", "actor_lr", "behavior_lr", "tau", "critic_tau", "grad_clip")


def check_online_config(cfg: DictConfig) -> None:
    """The online script's own settings, one message per bad value (validate_config does the shared ones)."""
    problems = []
    if cfg.mode not in MODES:
        problems.append(f"mode={cfg.mode!r}: expected one of {MODES}")
    elif cfg.reference not in REFERENCES[cfg.mode]:
        problems.append(f"reference={cfg.reference!r}: mode={cfg.mode} takes one of {REFERENCES[cfg.mode]}")
    c = cfg.collector
    for key, value, low in (
        ("collector.total_frames", c.total_frames, 1),
        ("collector.frames_per_batch", c.frames_per_batch, 1),
        ("collector.init_random_frames", c.init_random_frames, 0),
        ("replay.capacity", cfg.replay.capacity, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append(f"{key}={value!r}: expected an integer >= {low}")
    if not (isinstance(cfg.optim.utd_ratio, (int, float)) and cfg.optim.utd_ratio > 0):
        problems.append(f"optim.utd_ratio={cfg.optim.utd_ratio!r}: expected a number > 0 (updates per frame)")
    try:
        check_offline_fraction(cfg.replay.offline_fraction, "replay.offline_fraction")
    except ValueError as err:
        problems.append(str(err))
    if cfg.auto_eta.enabled:
        if not (isinstance(cfg.auto_eta.target_kl_per_dim, (int, float)) and cfg.auto_eta.target_kl_per_dim > 0):
            problems.append(f"auto_eta.target_kl_per_dim={cfg.auto_eta.target_kl_per_dim!r}: expected a number > 0")
        if cfg.anneal_eta.final is not None:
            problems.append("auto_eta.enabled and anneal_eta.final both set eta: choose one")
    a = cfg.anneal_eta
    if a.final is not None and not (isinstance(a.final, (int, float)) and a.final > 0 and isinstance(a.frames, int) and a.frames > 0):
        problems.append(f"anneal_eta.final={a.final!r}, anneal_eta.frames={a.frames!r}: expected a number > 0 and an integer > 0")
    for key in ("collector.total_frames", "collector.init_random_frames", "eval.interval", "logger.log_interval", "checkpoint.interval"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0 and value % c.frames_per_batch:
            problems.append(
                f"{key}={value}: expected a multiple of collector.frames_per_batch={c.frames_per_batch} (it is counted in frames, checked after each batch)"
            )
    f = cfg.reference_fit
    for key, value, low in (("reference_fit.steps", f.steps, 0), ("reference_fit.batch_size", f.batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append(f"{key}={value!r}: expected an integer >= {low}")
    if cfg.mode == "offline2online" and f.steps:
        problems.append(f"reference_fit.steps={f.steps}: mode=offline2online starts the actor from the offline run; set reference_fit.steps=0")
    if cfg.mode == "offline2online" and not cfg.offline.run and not cfg.offline.overrides:
        problems.append(
            "mode=offline2online needs an offline start: offline.run=<an offline run's folder (config.yaml, "
            'checkpoint.pt)> or \'offline.overrides=["task=...","budget=..."]\' to run bdpo_offline.py first'
        )
    if problems:
        raise ValueError("invalid config values:\n  " + "\n  ".join(problems))


def offline_start(cfg: DictConfig, out_dir: Path) -> tuple[DictConfig, dict]:
    """The offline run's config and its phase-B checkpoint state (running it first if asked)."""
    if cfg.offline.run:
        run = Path(cfg.offline.run)
    else:
        from hydra import compose

        import bdpo_offline

        run = out_dir / "offline"
        overrides = [*cfg.offline.overrides, f"output_dir={run}", f"seed={cfg.seed}", f"device={cfg.device}"]
        if (run / "checkpoint.pt").exists():
            overrides.append("checkpoint.resume=true")
        offline_cfg = compose(config_name="offline", overrides=overrides)
        print(f"offline2online: running bdpo_offline.py {' '.join(cfg.offline.overrides)} into {run}")
        bdpo_offline.train(offline_cfg)
    config, ckpt = run / "config.yaml", run / "checkpoint.pt"
    for path in (config, ckpt):
        if not path.exists():
            raise FileNotFoundError(
                f"offline.run={run}: {path.name} not found. Point offline.run at the folder of a bdpo_offline.py "
                f"run (it holds config.yaml and checkpoint.pt), or set offline.overrides to run one first."
            )
    offline_cfg = OmegaConf.load(config)
    state = checkpoint_io.load_checkpoint(ckpt)
    o = offline_cfg.optim
    if state.get("phase") != "train" or state.get("step") != o.steps:
        raise ValueError(
            f"{ckpt} is at phase {state.get('phase')!r}, step {state.get('step')}: offline2online starts from a "
            f"finished offline run (phase 'train', step {o.steps}). Finish it first (checkpoint.resume=true)."
        )
    return offline_cfg, state


def make_train_env(name: str, seed: int):
    """``make_env`` + ``ActionScaling`` onto [-1, 1] where needed + ``RewardSum`` (episode returns)."""
    from torchrl.envs import RewardSum, TransformedEnv

    env = make_env(name, seed)
    scaling = action_scaling_for(env)
    if scaling is not None:
        env = TransformedEnv(env, scaling)
    env = TransformedEnv(env, RewardSum())
    check_unit_action_box(env)
    return env


def plot_curve(rows: list[dict], train_returns: list[tuple[int, float]], out: Path, title: str, rule: str) -> Path | None:
    if not rows and not train_returns:
        return None
    from torchrl_bdpo.plotting import curve, finish, subplots

    probe = [r for r in rows if "q_policy" in r]
    fig, axes = subplots(2, width=11, height=3.5) if probe else subplots()
    ax = axes[0]
    if train_returns:
        x, y = zip(*train_returns)
        ax.plot(x, y, ".", color="gray", alpha=0.4, ms=3, label="training episodes (exploration)")
    if rows:
        x = [r["frames"] for r in rows]
        for key, label, color in (("return", rule, "C1"), ("return_one_sample", "one sample", "C2")):
            curve(ax, x, ([r[f"{key}_mean"] for r in rows], [r[f"{key}_std"] for r in rows]), label, color, band="std")
        if rows[0].get("start_return") is not None:
            ax.axhline(rows[0]["start_return"], color="k", ls="--", lw=1, label=f"offline start ({rule})")
    panels = [(ax, "environment frames", "return")]
    if probe:  # overestimation on the policy's own actions: Q above the return that followed
        x = [r["frames"] for r in probe]
        for suffix, who, color in (("", rule, "C1"), ("_one_sample", "one sample", "C2")):
            rows_with = [r for r in probe if f"q_policy{suffix}" in r]
            if rows_with:
                xs = [r["frames"] for r in rows_with]
                axes[1].plot(xs, [r[f"q_policy{suffix}"] for r in rows_with], marker=".", color=color, label=f"target Q on the actions ({who})")
                plot_probe_returns(axes[1], xs, rows_with, color, suffix, f" ({who})")
        panels.append((axes[1], "environment frames", "discounted return (scaled rewards)"))
    return finish(fig, panels, out / "learning_curve.png", title=title)


def offline_data(cfg: DictConfig, offline_cfg: DictConfig | None):
    """``(offline buffer or None, env name, reward scale)``: offline2online reads the offline run's
    dataset (its env and reward scale); online runs take ``env.name`` and ``env.reward_scale``."""
    if offline_cfg is None:
        return None, cfg.env.name, float(cfg.env.reward_scale)
    oe = offline_cfg.env
    buffer = make_offline_buffer(oe.dataset, cfg.optim.batch_size, reward_mode=oe.reward_mode, download=oe.download)
    info = buffer.dataset_info
    return buffer, cfg.env.name or eval_env_id(info, oe.get("eval_env")), float(info.reward_scale)


class Replay:
    """The run's replay: collector batches in, training batches out, its state in the checkpoint.

    online: a replay of the collector's transitions, in the offline buffers' keys and with the
    rewards scaled by ``reward_scale`` (``to_offline_layout``). offline2online: an
    ``OfflineToOnlineBuffer`` over the offline data, ``offline_fraction`` of each batch from it.
    """

    def __init__(self, capacity: int, batch_size: int, reward_scale: float, offline_buffer=None, offline_fraction=None):
        from torchrl.data import LazyTensorStorage, ReplayBuffer

        self.batch_size = batch_size
        if offline_buffer is not None:
            self.mixed = OfflineToOnlineBuffer(offline_buffer, online_capacity=capacity, offline_fraction=offline_fraction, batch_size=batch_size)
            self.online = self.mixed._online_buffer
        else:
            self.mixed, self.reward_scale = None, reward_scale
            self.online = ReplayBuffer(storage=LazyTensorStorage(capacity), batch_size=batch_size)

    def add(self, batch) -> None:
        if self.mixed is not None:
            self.mixed.extend(batch)
        else:
            self.online.extend(to_offline_layout(batch, self.reward_scale))

    def sample(self):
        return self.mixed.sample() if self.mixed is not None else self.online.sample()

    def ready(self) -> bool:
        """Whether a training batch can be drawn (the offline data always; online, a batch stored)."""
        return self.mixed is not None or len(self.online) >= self.batch_size

    def stored(self):
        """The online transitions stored so far (a view of the storage)."""
        return self.online.storage._storage[: len(self.online)]

    def state_dict(self) -> dict:
        return {
            "data": self.stored().clone() if len(self.online) else None,
            "cursor": self.online._writer._cursor,
            "write_count": self.online._writer._write_count,
        }

    def load_state_dict(self, stored: dict) -> None:
        if stored["data"] is not None:
            self.online.extend(stored["data"])
            self.online._writer._cursor = stored["cursor"]
            self.online._writer._write_count = stored["write_count"]


def fit_to_reference(loss, replay: Replay, fit: DictConfig, device: torch.device) -> dict:
    """The fresh actor (and its target) fitted to the reference on the online replay's states."""
    from torchrl_bdpo.training import fit_actor_to_reference

    observation = replay.stored().get("observation").to(device)
    t0 = time.perf_counter()
    result = fit_actor_to_reference(loss, observation, steps=fit.steps, batch_size=fit.batch_size, lr=fit.lr)
    result["seconds"] = time.perf_counter() - t0
    print(
        f"actor fitted to the reference on {observation.shape[0]} states: path KL {result['kl_start']:.3g} -> {result['kl_end']:.3g} nats ({fit.steps} steps)"
    )
    return result


def train(cfg: DictConfig) -> dict:
    from torchrl.collectors import Collector
    from torchrl.envs.utils import ExplorationType

    check_online_config(cfg)
    out_dir = Path(cfg.output_dir)
    offline_cfg = offline_state = None
    if cfg.mode == "offline2online":
        offline_cfg, offline_state = offline_start(cfg, out_dir)
        # the offline run's networks and loss; its optimiser settings where this config says null
        inherited = {k: offline_cfg.optim[k] for k in INHERITED_OPTIM if cfg.optim.get(k) is None}
        cfg = OmegaConf.merge(cfg, {k: offline_cfg[k] for k in MODEL_BLOCKS}, {"optim": inherited})
    cfg.optim.train_behavior = cfg.reference == "behavior_train"
    out_dir, resume_state, finished = start_run(cfg, lambda s: s["frames"] >= cfg.collector.total_frames)
    if finished is not None:
        return finished
    start = run_start(resume_state)
    o, e, c = cfg.optim, cfg.eval, cfg.collector
    device = torch.device(cfg.device)

    offline_buffer, env_name, reward_scale = offline_data(cfg, offline_cfg)
    info = offline_buffer.dataset_info if offline_buffer is not None else None
    env = make_train_env(env_name, cfg.seed)
    eval_env = make_train_env(env_name, eval_seed(cfg.seed)) if e.episodes > 0 else None
    observation_dim = env.observation_spec["observation"].shape[-1]
    action_dim = env.action_spec.shape[-1]
    if info is not None:
        check_env_compatibility(info, env)  # the env's observation and action dims against the offline data's

    loss = make_bdpo_loss(cfg, observation_dim, action_dim, reference=cfg.reference if cfg.mode == "online" else None)
    if offline_state is not None:
        loss.load_state_dict(offline_state["loss"])
    optimizers, schedulers, update = make_training(cfg, loss, constant_lr=True)  # constant rates online
    tuner = None
    if cfg.auto_eta.enabled:
        tuner = EtaLagrangian(loss, target_kl_per_dim=cfg.auto_eta.target_kl_per_dim, lr=cfg.auto_eta.lr)
    eta_start = float(loss.eta)

    replay = Replay(cfg.replay.capacity, o.batch_size, reward_scale, offline_buffer, cfg.replay.offline_fraction)

    logger = make_logger(cfg, out_dir)
    ckpt = out_dir / "checkpoint.pt"
    frames = updates = 0
    reference_fit = None  # the fit's path KL before and after, once it has run
    eval_rows: list[dict] = []
    train_returns: list[tuple[int, float]] = []
    if resume_state is not None:
        _, updates = load_checkpoint(resume_state, cfg, loss, optimizers, schedulers)
        frames = resume_state["frames"]
        eval_rows, train_returns = resume_state["evals"], [tuple(x) for x in resume_state["train_returns"]]
        reference_fit = resume_state.get("reference_fit")
        replay.load_state_dict(resume_state["replay"])
        if tuner is not None:
            tuner.load_state_dict(resume_state["eta"])
        else:
            loss.set_eta(resume_state["eta_value"])
        truncate_csv_logs(out_dir / "logs", frames)
        print(f"resumed from {ckpt}: {frames} frames, {updates} updates")
    written = ckpt if ckpt.exists() else None
    # where the run's time goes: acting and env steps in the collector, updates, evaluations
    seconds = {"collect": 0.0, "update": 0.0, "eval": 0.0}
    if resume_state is not None:
        seconds.update(resume_state.get("time_s", {}))

    def checkpoint():
        nonlocal written
        if replay.ready():
            check_state_before_saving(loss, lambda: replay.sample().to(device), "train", updates, written)
        state = training_state(loss, optimizers, schedulers, "online", updates, cfg, start)
        state.update(
            frames=frames,
            evals=eval_rows,
            train_returns=[list(x) for x in train_returns],
            reference_fit=reference_fit,
            replay=replay.state_dict(),
            eta=tuner.state_dict() if tuner is not None else None,
            eta_value=float(loss.eta),
            time_s=dict(seconds),
        )
        save_checkpoint(ckpt, state)
        written = ckpt

    acting = loss.make_acting_module(num_candidates=e.num_candidates, cudagraphs=cfg.compile.cudagraphs, **selection_kwargs(cfg))

    def run_eval():
        if eval_env is None:
            return None
        t_eval = time.perf_counter()
        # the same start states for both at every evaluation, and on resume
        best, episodes = evaluate(eval_env, acting, e.episodes, e.max_steps, ExplorationType.DETERMINISTIC, keep_episodes=True, seed=eval_seed(cfg.seed))
        one, one_eps = evaluate(eval_env, acting, e.episodes, e.max_steps, ExplorationType.RANDOM, keep_episodes=True, seed=eval_seed(cfg.seed))
        row = {
            "frames": frames,
            "updates": updates,
            "eta": float(loss.eta),
            "return_mean": float(best.mean()),
            "return_std": float(best.std()),
            "return_one_sample_mean": float(one.mean()),
            "return_one_sample_std": float(one.std()),
        }
        # Q on the actions the best-of-K policy took against their Monte Carlo return, and the
        # path KL per state; the same for the one-sample policy (suffix _one_sample), the actor
        # the collector and the Q target sample, whose actions no ranking by Q picked; on a
        # forked generator, so the probe leaves the training's draws as they would be without it
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            row.update(policy_value_probe(loss, episodes, reward_scale, cfg.loss.gamma, device))
            one_probe = policy_value_probe(loss, one_eps, reward_scale, cfg.loss.gamma, device)
            row.update({f"{k}_one_sample": v for k, v in one_probe.items()})
        if info is not None and info.ref_min_score is not None and info.ref_max_score is not None:
            row["score_mean"] = float(info.normalized_score(best.mean()))
        if eval_rows and "start_return" in eval_rows[0]:
            row["start_return"] = eval_rows[0]["start_return"]
        eval_rows.append(row)
        log_scalars(logger, {f"eval/{k}": v for k, v in row.items() if k not in ("frames", "updates")}, frames)
        seconds["eval"] += time.perf_counter() - t_eval
        return row

    if frames == 0 and cfg.mode == "offline2online" and e.episodes > 0:
        row = run_eval()  # the offline start: the reference line of the curve
        row["start_return"] = row["return_mean"]

    bar = tqdm(total=c.total_frames, initial=frames, desc=f"BDPO {cfg.mode} on {env_name}")
    tic, tic_frames = time.perf_counter(), frames
    last_row: dict = {}
    # one collector per checkpoint interval, its env reseeded from the frame count: a resumed run
    # collects exactly what an uninterrupted one does (an episode is cut at each checkpoint;
    # its transitions are not terminal, so Q bootstraps through the cut as through a time limit)
    while frames < c.total_frames:
        segment = min(cfg.checkpoint.interval - frames % cfg.checkpoint.interval, c.total_frames - frames)
        env.set_seed(cfg.seed + frames)
        collector = Collector(
            env,
            acting,
            frames_per_batch=c.frames_per_batch,
            total_frames=segment,
            init_random_frames=max(0, c.init_random_frames - frames),
            auto_register_policy_transforms=False,  # not recurrent: no InitTracker (docs/composing.md)
        )
        t_mark = time.perf_counter()
        for batch in collector:
            seconds["collect"] += time.perf_counter() - t_mark
            batch = batch.reshape(-1)
            frames += batch.numel()
            replay.add(batch)
            done = batch.get(("next", "done")).reshape(-1)
            ends = batch.get(("next", "episode_reward")).reshape(-1)[done]
            train_returns += [(frames, float(r)) for r in ends]
            row = critic = None
            if frames >= c.init_random_frames and replay.ready():
                t_update = time.perf_counter()
                if updates == 0 and cfg.reference_fit.steps:
                    reference_fit = fit_to_reference(loss, replay, cfg.reference_fit, device)
                    log_scalars(logger, {f"train/reference_fit_{k}": v for k, v in reference_fit.items()}, frames)
                for _ in range(max(1, round(o.utd_ratio * batch.numel()))):
                    row, critic = train_step(update, schedulers, replay.sample().to(device), updates, o, written)
                    if tuner is not None:
                        row.update(tuner.step(critic["path_kl"]))
                    elif cfg.anneal_eta.final is not None:
                        w = min(1.0, frames / cfg.anneal_eta.frames)
                        loss.set_eta(eta_start + w * (cfg.anneal_eta.final - eta_start))
                    last_row.update(row)  # the actor's entries stay from its last step
                    updates += 1
                collector.update_policy_weights_()
                seconds["update"] += time.perf_counter() - t_update
            bar.update(batch.numel())
            if frames % cfg.logger.log_interval == 0:
                now = time.perf_counter()
                scalars = {"train/frames_per_s": (frames - tic_frames) / max(now - tic, 1e-9), "train/eta": float(loss.eta)}
                tic, tic_frames = now, frames
                if ends.numel():
                    scalars["train/episode_return"] = float(ends.mean())
                if row is not None:
                    scalars.update(train_scalars(last_row, critic, float("nan")))
                log_scalars(logger, scalars, frames)
            if e.interval and frames % e.interval == 0:
                r = run_eval()
                if r:
                    bar.set_postfix(eval_return=f"{r['return_mean']:.0f}", one_sample=f"{r['return_one_sample_mean']:.0f}")
            t_mark = time.perf_counter()
        collector.shutdown()
        checkpoint()
    bar.close()
    if e.episodes > 0 and (not eval_rows or eval_rows[-1]["frames"] != frames):
        run_eval()  # the final policy is always evaluated
        checkpoint()
    env.close()
    if eval_env is not None:
        eval_env.close()

    final = eval_rows[-1] if eval_rows else None
    rule = acting_rule(cfg)
    figure = plot_curve(eval_rows, train_returns, out_dir, f"BDPO {cfg.mode} on {env_name}", rule)
    summary = write_summary(
        out_dir,
        cfg,
        start,
        env=env_name,
        frames=frames,
        updates=updates,
        final=final,
        best=max(eval_rows, key=lambda r: r["return_mean"]) if eval_rows else None,
        evaluations=eval_rows,
        train_episode_returns=train_returns,
        reference_fit=reference_fit,
        figure=None if figure is None else str(figure),
        time_s=dict(seconds),
    )
    result = (
        f"final return {final['return_mean']:.1f} +- {final['return_std']:.1f} ({rule}), {final['return_one_sample_mean']:.1f} (one sample)"
        if final
        else "no evaluation (eval.episodes=0)"
    )
    print(f"[{cfg.mode} {env_name}] {result}; {frames} frames, {updates} updates, {summary['wall_time_s']:.0f} s; outputs in {out_dir}")
    return summary


if __name__ == "__main__":
    hydra_main(train, "online")
