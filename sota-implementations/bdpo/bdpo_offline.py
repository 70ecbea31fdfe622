"""BDPO on offline RL datasets (D4RL, Minari, or generated here), evaluated in Gymnasium MuJoCo.

    python sota-implementations/bdpo/bdpo_offline.py task=generated-hopper-medium   # CPU-sized
    python sota-implementations/bdpo/bdpo_offline.py task=hopper-medium-v2 optim=paper  # the paper's budget

Phase A pretrains the behavior diffusion model (with its EMA); the actor and its target
start as copies of that EMA; phase B trains Q and V_n every step, and the actor and the
behavior every ``optim.actor_every``-th step after ``optim.warmup`` (docs/design.md section 4).
Evaluation runs the K-candidate acting module (the behavior model during phase A) in
TorchRL ``GymEnv``s (a ``ParallelEnv`` when ``eval.num_envs > 1``) and reports the mean and
std return and the normalised score. Under the output directory: CSV logs (or another
torchrl logger), ``checkpoint.pt`` (atomic; ``checkpoint.resume=true`` continues from it),
``summary.json`` and ``eval_returns.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts' utils
from utils import hydra_main, log_scalars, make_bdpo_loss, make_logger, make_training  # noqa: E402
from utils import acting_rule, per_env_paths, plot_probe_returns, policy_value_probe, resolve_per_env, resume_phases, run_phases  # noqa: E402
from utils import run_start, selection_kwargs, start_run, write_summary  # noqa: E402

from torchrl_bdpo.data import check_env_compatibility, dataset_env_id, discounted_returns, exact_return_mask, make_offline_buffer  # noqa: E402
from torchrl_bdpo.diffusion import QSelectActor  # noqa: E402
from torchrl_bdpo.envs import episode_stats, eval_env_id, eval_seed, evaluate, make_eval_env  # noqa: E402


def plot_evals(rows: list[dict], out: Path, rule: str) -> Path | None:
    if not rows:
        return None
    from torchrl_bdpo.plotting import curve, finish, subplots

    probe = [r for r in rows if "q_dataset" in r]
    fig, axes = subplots(2 if probe else 1, width=11 if probe else 6, height=3.5)
    ax = axes[0]
    for phase, color in (("pretrain", "C0"), ("train", "C1")):
        pts = [r for r in rows if r["phase"] == phase]
        if pts:
            label = "behavior (phase A)" if phase == "pretrain" else f"BDPO, {rule}"
            mean_std = ([r["return_mean"] for r in pts], [r["return_std"] for r in pts])
            curve(ax, [r["global_step"] for r in pts], mean_std, label, color, band="std", marker=".")
    extra = [r for r in rows if "return_one_sample_mean" in r]
    if extra:
        x = [r["global_step"] for r in extra]
        ax.plot(x, [r["return_one_sample_mean"] for r in extra], marker=".", color="C2", label="BDPO actor, one sample")
        ax.plot(x, [r["return_behavior_mean"] for r in extra], marker=".", ls=":", color="C0", label="behavior model, one sample")
        ranked = [r for r in extra if "return_behavior_best_of_k_mean" in r]  # rows of older runs lack it
        if ranked:
            ax.plot(
                [r["global_step"] for r in ranked],
                [r["return_behavior_best_of_k_mean"] for r in ranked],
                marker=".",
                ls="-.",
                color="C4",
                label=f"behavior model, {rule}",
            )
    if rows[0].get("dataset_return") is not None:
        ax.axhline(rows[0]["dataset_return"], color="gray", ls="--", label="dataset mean return")
    labels = [(ax, "gradient steps (phase A, then phase B)", "evaluation return")]
    if probe:  # a Q that runs away from the returns is the usual way offline RL fails
        ax = axes[1]
        x = [r["global_step"] for r in probe]
        ax.plot(x, [r["q_dataset"] for r in probe], marker=".", color="C1", label="target Q on dataset (s, a)")
        mc = [r for r in probe if "mc_return_dataset" in r]  # absent where no return is exact
        if mc:
            ax.plot([r["global_step"] for r in mc], [r["mc_return_dataset"] for r in mc], ls="--", color="gray", label="their MC return")
        pol = [r for r in probe if "q_policy" in r]
        if pol:
            xp = [r["global_step"] for r in pol]
            ax.plot(xp, [r["q_policy"] for r in pol], marker=".", color="C3", label="target Q on the policy's (s, a)")
            plot_probe_returns(ax, xp, pol, "C3")
        labels.append((ax, "gradient steps", "value (scaled rewards)"))
    return finish(fig, labels, out / "eval_returns.png")


def resolve_budget(cfg: DictConfig) -> dict:
    """The budget's per-environment values (``per_env`` in ``config/budget/cpu.yaml``) for the
    dataset's env, set before the run's config is checked and saved (utils.resolve_per_env);
    ``env.eval_env``, where set, names the env. Reads the dataset's metadata only when a value
    is ``per_env``."""
    if not per_env_paths(cfg):
        return {}
    env_id = cfg.env.get("eval_env") or dataset_env_id(cfg.env.dataset, download=cfg.env.download)
    return resolve_per_env(cfg, env_id)


def train(cfg: DictConfig) -> dict:
    resolve_budget(cfg)
    out_dir, resume_state, finished = start_run(cfg)
    if finished is not None:
        return finished
    start = run_start(resume_state)
    o, e = cfg.optim, cfg.eval
    device = torch.device(cfg.device)

    # the storage on the run's device: on a GPU, batches are gathered there, with no copy per step
    buffer = make_offline_buffer(cfg.env.dataset, o.batch_size, reward_mode=cfg.env.reward_mode, download=cfg.env.download, device=device)
    info = buffer.dataset_info
    if o.batch_size > len(buffer):
        raise ValueError(
            f"optim.batch_size={o.batch_size}: expected at most the dataset's {len(buffer)} transitions "
            f"({info.name}); a larger batch repeats transitions in every batch. Lower optim.batch_size."
        )
    data = buffer.storage[: len(buffer)].cpu()  # the dataset statistics below run on the CPU
    dataset_returns = None
    if info.reward_scale:
        from torchrl_bdpo.data import episode_returns

        dataset_returns = (episode_returns(data) / info.reward_scale).numpy()
    env = None
    env_seed = eval_seed(cfg.seed)  # every evaluation starts from the same states, resumed or not
    if e.episodes > 0:
        # Q diagnostic, logged with each evaluation: the target Q ensemble on a fixed set of
        # dataset (s, a) next to their Monte Carlo returns (scaled rewards), drawn where that
        # return is exact (exact_return_mask: not cut short by a time limit within the horizon;
        # a cut return is only a lower bound). Where no pair qualifies (time-limited episodes
        # shorter than the horizon, as HalfCheetah's 1000 steps at gamma 0.999) Q is still
        # logged, on pairs of any kind, without a Monte Carlo return to compare it with.
        exact = exact_return_mask(data, cfg.loss.gamma)
        measurable = bool(exact.any())
        pool = exact.nonzero().squeeze(-1) if measurable else torch.arange(len(data))
        probe_rows = pool[torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(cfg.seed))[:2048]]
        probe_mc = float(discounted_returns(data, cfg.loss.gamma)[probe_rows].mean()) if measurable else None
        if probe_mc is None:
            print(
                f"[{cfg.env.dataset}] eval/mc_return_dataset is not logged: no transition's Monte Carlo return is exact at "
                f"loss.gamma={cfg.loss.gamma} (every episode ends by a time limit with less than the horizon "
                "ceil(log 0.01 / log gamma) steps left); eval/q_dataset is logged alone."
            )
        probe = data[probe_rows]
        env_id = eval_env_id(info, cfg.env.get("eval_env"))
        env = make_eval_env(env_id, e.num_envs, env_seed, device, info.action_scaling())
        check_env_compatibility(info, env)  # before any training
    loss = make_bdpo_loss(cfg, info.observation_dim, info.action_dim)
    optimizers, schedulers, update = make_training(cfg, loss)
    logger = make_logger(cfg, out_dir)
    phase, step = resume_phases(resume_state, cfg, loss, optimizers, schedulers, out_dir)
    eval_rows: list[dict] = [] if resume_state is None else resume_state.get("evals", [])
    behavior_policy = QSelectActor(
        loss.behavior_network,
        loss.qvalue_network,
        actor_params=loss.target_behavior_network_params,
        qvalue_params=loss.target_qvalue_network_params,
        num_qvalue_nets=loss.num_qvalue_nets,
        num_candidates=e.num_candidates,  # RANDOM: one behavior sample; DETERMINISTIC: the best of K by Q
        **selection_kwargs(cfg),
    )
    # on a GPU, with compile.cudagraphs, acting replays a CUDA graph per batch shape too
    acting = loss.make_acting_module(num_candidates=e.num_candidates, cudagraphs=cfg.compile.cudagraphs, **selection_kwargs(cfg))

    def run_eval(phase_name, step_, global_step):
        from torchrl.envs.utils import ExplorationType

        if env is None:
            return None
        if phase_name == "pretrain":
            returns = evaluate(env, behavior_policy, e.episodes, e.max_steps, ExplorationType.RANDOM, seed=env_seed)
        else:
            # best-of-K by the target Q (DETERMINISTIC), the policy whose return is reported
            returns, episodes = evaluate(env, acting, e.episodes, e.max_steps, ExplorationType.DETERMINISTIC, keep_episodes=True, seed=env_seed)
        row = {
            "phase": phase_name,
            "step": step_,
            "global_step": global_step,
            "return_mean": float(returns.mean()),
            "return_std": float(returns.std()),
            "dataset_return": None if dataset_returns is None else float(dataset_returns.mean()),
        }
        if phase_name == "train":  # episode length and discounted return: a policy that falls sooner
            row.update({f"{k}_mean": v for k, v in episode_stats(episodes, cfg.loss.gamma).items()})
        if phase_name == "train":
            with torch.no_grad():
                q = loss._qvalue(loss.target_qvalue_network_params, probe.get("observation").to(device), probe.get("action").to(device))
            row["q_dataset"] = float(q.mean())
            if probe_mc is not None:
                row["mc_return_dataset"] = probe_mc
            if e.get("diagnostics", True):
                # what separates the causes of a drop: the actor alone (one sample), the
                # behavior alone, and Q on the actions the policy took against their return
                one, one_eps = evaluate(env, acting, e.episodes, e.max_steps, ExplorationType.RANDOM, keep_episodes=True, seed=env_seed)
                beh, beh_eps = evaluate(env, behavior_policy, e.episodes, e.max_steps, ExplorationType.RANDOM, keep_episodes=True, seed=env_seed)
                # the behavior's candidates ranked by the same Q: Q's ranking apart from the actor's moves
                beh_k, beh_k_eps = evaluate(env, behavior_policy, e.episodes, e.max_steps, ExplorationType.DETERMINISTIC, keep_episodes=True, seed=env_seed)
                row.update(
                    return_one_sample_mean=float(one.mean()),
                    return_one_sample_std=float(one.std()),
                    return_behavior_mean=float(beh.mean()),
                    return_behavior_std=float(beh.std()),
                    return_behavior_best_of_k_mean=float(beh_k.mean()),
                    return_behavior_best_of_k_std=float(beh_k.std()),
                )
                for name, eps in (("one_sample", one_eps), ("behavior", beh_eps), ("behavior_best_of_k", beh_k_eps)):
                    row.update({f"{k}_{name}_mean": v for k, v in episode_stats(eps, cfg.loss.gamma).items()})
                row.update(policy_value_probe(loss, episodes, info.reward_scale or 1.0, cfg.loss.gamma, device))
        if info.ref_min_score is not None and info.ref_max_score is not None:
            scores = info.normalized_score(returns)
            row.update(score_mean=float(scores.mean()), score_std=float(scores.std()))
        eval_rows.append(row)
        log_scalars(logger, {f"eval/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "global_step")}, global_step)
        return row

    history = run_phases(
        cfg,
        loss,
        update,
        optimizers,
        schedulers,
        buffer,
        logger,
        out_dir,
        phase,
        step,
        start=start,
        evaluate=run_eval,
        extra_state=lambda: {"evals": eval_rows},
    )
    if env is not None:
        env.close()

    final = next((r for r in reversed(eval_rows) if r["phase"] == "train"), None)
    trained = [r for r in eval_rows if r["phase"] == "train"]
    best = max(trained, key=lambda r: r["return_mean"]) if trained else None
    figure = plot_evals(eval_rows, out_dir, acting_rule(cfg))
    summary = write_summary(
        out_dir,
        cfg,
        start,
        final=final,
        best=best,
        evaluations=eval_rows,
        figure=None if figure is None else str(figure),
        dataset={**info.as_dict(), "mean_episode_return": None if dataset_returns is None else float(dataset_returns.mean())},
    )
    data_ret = summary["dataset"]["mean_episode_return"]
    data_ret = "n/a" if data_ret is None else f"{data_ret:.1f}"
    if final:
        score = f", normalised {final['score_mean']:.1f}" if "score_mean" in final else ""
        result = f"final return {final['return_mean']:.1f} +- {final['return_std']:.1f}{score}"
    else:
        result = "trained without evaluation (eval.episodes=0)" if e.episodes == 0 else "no phase-B step ran (optim.steps=0)"
    print(f"[{cfg.env.dataset}] {result} (dataset mean {data_ret}); {summary['wall_time_s']:.0f} s; outputs in {out_dir}")
    summary["history"] = history
    return summary


if __name__ == "__main__":
    hydra_main(train, "offline")
