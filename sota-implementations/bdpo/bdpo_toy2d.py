"""BDPO on the paper's 2D bandits: train, compare with the exact optimum, draw the figures.

    python sota-implementations/bdpo/bdpo_toy2d.py env.dataset=8gaussians
    python sota-implementations/bdpo/bdpo_toy2d.py --config-name toy2d_paper   # GPU-sized

Phase A pretrains the behavior diffusion model (with its EMA); the actor starts as a
copy of that EMA; phase B trains Q, V_n, the actor and the behavior (docs/design.md section 4).
Every transition is terminal, so the Q target is the reward and no next-state path is
sampled. The run writes, under its output directory: CSV logs, checkpoints, summary.json
and three PNG figures (targets at a few eta, actor samples with their paths, V_n
landscapes at n = N, 3N/4, N/2, N/4 and 0 where V_0 = Q).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import DictConfig
from tensordict.nn import TensorDictModule

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts' utils
from utils import hydra_main, log_scalars, make_bdpo_loss, make_logger, make_training  # noqa: E402
from utils import resume_phases, run_phases, run_start, start_run, write_summary  # noqa: E402

from torchrl_bdpo.data import TOY_DATASETS, make_toy_buffer, optimal_value, sample_optimal_policy, toy_energy  # noqa: E402
from torchrl_bdpo.metrics import mmd_rbf, sliced_wasserstein  # noqa: E402


def knn_reward(points: torch.Tensor, data_actions: torch.Tensor, data_rewards: torch.Tensor, k: int = 10, max_data: int = 100_000) -> torch.Tensor:
    """Energy at arbitrary points: mean energy of the k nearest dataset points (of the first ``max_data``).

    Some toy energies depend on a latent label (the moon, the spiral's t), not on the
    point alone; the same estimator is applied to actor, behavior and pi* samples.
    """
    data_actions, data_rewards = data_actions[:max_data], data_rewards[:max_data]
    out = []
    for chunk in points.split(1024):
        idx = torch.cdist(chunk, data_actions).topk(k, largest=False).indices
        out.append(data_rewards[idx].mean(-1))
    return torch.cat(out)


def loss_device(loss) -> torch.device:
    """Where the loss's networks live (``cfg.device``); metrics and figures are computed on the CPU."""
    return next(loss.parameters()).device


@torch.no_grad()
def evaluate(loss, data_actions, data_rewards, eta, num, seed):
    """The metrics against pi* and the data, and the behavior model's samples (for the figures)."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.zeros(num, 1, device=loss_device(loss))
    with loss.target_actor_network_params.to_module(loss.actor_network):
        actor = loss.actor_network.sample_path(obs).action.cpu()
    with loss.target_behavior_network_params.to_module(loss.behavior_network):
        behavior = loss.behavior_network.sample_path(obs).action.cpu()
    p_star = sample_optimal_policy(data_actions, data_rewards, eta, num, generator=g)
    r = lambda x: knn_reward(x, data_actions, data_rewards).mean().item()  # noqa: E731
    metrics = {
        "sw_actor_pstar": sliced_wasserstein(actor, p_star, generator=g).item(),
        "sw_behavior_pstar": sliced_wasserstein(behavior, p_star, generator=g).item(),
        "mmd2_actor_pstar": mmd_rbf(actor, p_star).item(),
        "mmd2_behavior_pstar": mmd_rbf(behavior, p_star).item(),
        "reward_actor": r(actor),
        "reward_behavior": r(behavior),
        "reward_pstar": r(p_star),
        "reward_data": data_rewards.mean().item(),
        "optimal_value": optimal_value(data_rewards, eta),
    }
    # how well the behavior model fits the data (the actor is regularised towards it), against
    # the same statistic between two draws of the data: its noise floor at this sample size
    data = data_actions[torch.randint(0, data_actions.shape[0], (2, num), generator=g)]
    metrics["mmd2_behavior_data"] = mmd_rbf(behavior, data[0]).item()
    metrics["mmd2_data_data"] = mmd_rbf(data[1], data[0]).item()
    return metrics, behavior


def plot_figures(loss, data_actions, data_rewards, behavior, eta, out_dir: Path, seed: int) -> list[Path]:
    """The three figures; ``behavior``: the behavior model's samples that :func:`evaluate` drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(seed)
    lim = float(data_actions.abs().quantile(0.999)) * 1.1
    paths = []

    def save(fig, square_axes, name):
        for ax in square_axes:
            ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal")
        fig.tight_layout()
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)

    # 1. target distributions: the data reweighted by exp(r / eta)
    etas = [eta * 10, eta * 3, eta, eta / 3]
    fig, axes = plt.subplots(1, len(etas) + 1, figsize=(3.2 * (len(etas) + 1), 3.4))
    sub = data_actions[torch.randint(0, data_actions.shape[0], (4000,), generator=g)]
    axes[0].scatter(*sub.T, s=1, alpha=0.4)
    axes[0].set_title("behavior data")
    for ax, e in zip(axes[1:], etas):
        s = sample_optimal_policy(data_actions, data_rewards, e, 4000, generator=g)
        ax.scatter(*s.T, s=1, alpha=0.4, color="C3")
        ax.set_title(f"π* ∝ ν exp(r/η), η={e:.3g}")
    save(fig, axes, "targets.png")

    # 2. behavior and actor samples, and the actor's diffusion paths: the actor is regularised
    # towards the behavior model, so structure the behavior misses (too short a pretraining)
    # the actor cannot have either
    with torch.no_grad(), loss.target_actor_network_params.to_module(loss.actor_network):
        path = loss.actor_network.sample_path(torch.zeros(2000, 1, device=loss_device(loss)))
    action, actions = path.action.cpu(), path.actions.cpu()
    p_star = sample_optimal_policy(data_actions, data_rewards, eta, 2000, generator=g)
    fig, axes = plt.subplots(1, 4, figsize=(13.2, 3.6))
    axes[0].scatter(*behavior.T, s=1, alpha=0.4, color="C0")
    axes[0].set_title("behavior model ν samples")
    axes[1].scatter(*p_star.T, s=1, alpha=0.4, color="C3")
    axes[1].set_title(f"π* ∝ data·exp(r/η), η={eta:g}")
    axes[2].scatter(*action.T, s=1, alpha=0.4, color="C2")
    axes[2].set_title("BDPO actor samples")
    for i in range(40):
        axes[3].plot(*actions[:, i].T, lw=0.5, alpha=0.7)
        axes[3].plot(*action[i], "k.", ms=3)
    axes[3].set_title("actor paths a^N → a^0")
    save(fig, axes, "actor_samples.png")

    # 3. V_n landscapes on a grid; V_0 is Q
    N = loss.actor_network.num_steps
    steps = sorted({N, (3 * N) // 4, N // 2, N // 4, 0}, reverse=True)
    grid = torch.linspace(-lim, lim, 80)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)
    pts = pts.to(loss_device(loss))
    obs = pts.new_zeros(pts.shape[0], 1)
    fig, axes = plt.subplots(1, len(steps), figsize=(3.2 * len(steps), 3.2))
    with torch.no_grad():
        for ax, n in zip(axes, steps):
            if n == 0:
                v = loss._qvalue(loss.target_qvalue_network_params, obs, pts).mean(0)
            else:
                step_n = torch.full((pts.shape[0],), n, device=pts.device)
                v = loss._value(loss.target_value_network_params, obs, pts, step_n).mean(0)
            v = v.cpu()
            ax.imshow(v.reshape(80, 80), origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis")
            ax.set_title(f"V_{n}" + (" = Q" if n == 0 else ""))
    save(fig, [], "values.png")
    return paths


class _PointEnergy(torch.nn.Module):
    def __init__(self, dataset: str) -> None:
        super().__init__()
        self.energy = toy_energy(dataset)

    def forward(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.energy(action).unsqueeze(-1)


def true_reward_q(cfg: DictConfig):
    """``critic.true_reward=true``: the dataset's energy as a parameter-free Q, else ``None``."""
    if not cfg.critic.get("true_reward", False):
        return None
    try:
        module = _PointEnergy(cfg.env.dataset)
    except ValueError as err:
        raise ValueError(f"critic.true_reward=true: {err} Or set critic.true_reward=false.") from err
    return TensorDictModule(module, in_keys=["observation", "action"], out_keys=["state_action_value"])


def train(cfg: DictConfig) -> dict:
    if cfg.env.dataset not in TOY_DATASETS:
        raise ValueError(f"env.dataset={cfg.env.dataset!r}: expected one of {TOY_DATASETS}.")
    out_dir, resume_state, finished = start_run(cfg)
    if finished is not None:
        return finished
    start = run_start(resume_state)

    # the storage on the run's device: on a GPU, batches are gathered there, with no copy per step
    buffer = make_toy_buffer(cfg.env.dataset, cfg.optim.batch_size, cfg.env.num_points, seed=cfg.seed, device=cfg.device)
    all_data = buffer[:].cpu()  # metrics and figures run on the CPU
    data_actions, data_rewards = all_data["action"], all_data["next", "reward"].squeeze(-1)
    loss = make_bdpo_loss(cfg, observation_dim=1, action_dim=2, qvalue_network=true_reward_q(cfg))
    optimizers, schedulers, update = make_training(cfg, loss)
    logger = make_logger(cfg, out_dir)
    o = cfg.optim
    # each phase logs on its own step axis; every transition is terminal: no Q-target paths to log
    phase, step = resume_phases(resume_state, cfg, loss, optimizers, schedulers, out_dir, global_steps=False)
    history = run_phases(
        cfg, loss, update, optimizers, schedulers, buffer, logger, out_dir, phase, step, start=start, global_steps=False, next_state_paths=False
    )

    metrics, behavior = evaluate(loss, data_actions, data_rewards, cfg.loss.eta, cfg.eval.num_samples, cfg.seed)
    log_scalars(logger, {f"eval/{k}": v for k, v in metrics.items()}, o.steps)
    figures = plot_figures(loss, data_actions, data_rewards, behavior, cfg.loss.eta, out_dir, cfg.seed)
    summary = write_summary(
        out_dir,
        cfg,
        start,
        metrics=metrics,
        figures=[str(p) for p in figures],
        distance_ratio_behavior_over_actor=metrics["sw_behavior_pstar"] / max(metrics["sw_actor_pstar"], 1e-12),
    )
    print(
        f"[{cfg.env.dataset}] sliced W2 to pi*: actor {metrics['sw_actor_pstar']:.3f}, behavior "
        f"{metrics['sw_behavior_pstar']:.3f}; E r: actor {metrics['reward_actor']:.3f}, behavior "
        f"{metrics['reward_behavior']:.3f}, pi* {metrics['reward_pstar']:.3f}; behavior fit, MMD^2 to "
        f"the data {metrics['mmd2_behavior_data']:.4f} (data to data {metrics['mmd2_data_data']:.4f}); "
        f"{summary['wall_time_s']:.0f} s; outputs in {out_dir}"
    )
    summary["history"] = history
    return summary


if __name__ == "__main__":
    hydra_main(train, "toy2d")
