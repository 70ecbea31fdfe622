"""KL-regularised reward fine-tuning of a pretrained diffusion model with PathwiseKLLoss.

The case RLHF-style fine-tuning is about: a pretrained model ``p_ref``, a reward ``r``,
and the objective ``E_p[r] - eta KL(p || p_ref)``, whose optimum is known exactly:
``p* ∝ p_ref exp(r / eta)``. The script

1. pretrains a DDPM on a 2D dataset (the paper's 8gaussians by default) with ``DenoisingLoss``;
2. fine-tunes a copy in two styles, each against the frozen pretrained model:

   - ``differentiable``: backpropagate ``r(a^0)`` through the whole reverse chain and add
     ``eta * sum_n l_n`` from :class:`PathwiseKLLoss` (the DRaFT / ReFL family);
   - ``blackbox``: the reward is only queried, never differentiated. A Q ensemble regresses
     it on samples of the pretrained model, and BDPO's per-step values and one-step
     improvement (``BDPOLoss.value_loss`` / ``actor_loss``) do the rest;

3. measures both against ``p*`` (the pretrained model's own samples resampled with weights
   ``exp(r / eta)``), prints the numbers and writes a PNG.

    python examples/kl_finetune_2d.py --out kl_finetune_2d.png

The schedule uses ``final_noise=True`` so that ``sum_n l_n`` is the exact KL of the two
sampling processes (see the README). Plugging in your own model: wrap any
``network(a_n, n, observation) -> eps`` as ``DiffusionActor(network, schedule)``; both models
must share the schedule (``PathwiseKLLoss`` raises otherwise).
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path

import torch
from tensordict import TensorDict
from tqdm import trange

from torchrl_bdpo.data import make_toy_data, optimal_value, sample_optimal_policy
from torchrl_bdpo.diffusion import DiffusionActor, EpsilonNetwork, make_qvalue_operator, make_schedule, make_value_operator
from torchrl_bdpo.metrics import mmd_rbf
from torchrl_bdpo.objectives import BDPOLoss, DenoisingLoss, PathwiseKLLoss, TargetSoftUpdate


def tilt_reward(action: torch.Tensor) -> torch.Tensor:
    """The default reward: ``(a_x + a_y) / 4``, favouring the upper-right of the plane."""
    return (action[..., 0] + action[..., 1]) / 4


def pretrain(dataset="8gaussians", num_steps=10, steps=2000, batch=256, hidden=128, lr=3e-3, seed=0, progress=True):
    """Fit a DDPM (vp schedule, ``final_noise=True``) to a toy dataset; returns the model."""
    torch.manual_seed(seed)
    data = make_toy_data(dataset, 200_000, seed=seed)["action"]
    model = DiffusionActor(EpsilonNetwork(2, 1, hidden=hidden, depth=3), make_schedule("vp", num_steps, final_noise=True))
    loss = DenoisingLoss(model)
    optim = torch.optim.Adam(loss.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, steps)
    obs = torch.zeros(batch, 1)
    for _ in trange(steps, desc="pretrain", disable=not progress):
        idx = torch.randint(0, data.shape[0], (batch,))
        out = loss(TensorDict({"observation": obs, "action": data[idx]}, [batch]))
        optim.zero_grad()
        out["loss_denoising"].backward()
        optim.step()
        sched.step()
    return model


def finetune_differentiable(pretrained, reward=tilt_reward, eta=0.5, steps=300, batch=256, lr=1e-3, progress=True):
    """Maximise ``E[r(a^0)] - eta * KL_path`` by backpropagating through the chain."""
    policy = copy.deepcopy(pretrained)
    kl_loss = PathwiseKLLoss(policy, pretrained, detach_path=False)
    optim = torch.optim.Adam(kl_loss.parameters(), lr=lr)
    obs = torch.zeros(batch, 1)
    bar = trange(steps, desc="fine-tune (differentiable)", disable=not progress)
    for step in bar:
        kl, _, path = kl_loss.path_kl(obs)
        objective = reward(path.action) - eta * kl
        optim.zero_grad()
        (-objective.mean()).backward()
        optim.step()
        if step % 50 == 0:
            bar.set_postfix(objective=f"{objective.mean().item():.3f}", kl=f"{kl.mean().item():.3f}")
    return policy


def finetune_blackbox(
    pretrained, reward=tilt_reward, eta=0.5, steps=600, batch=256, num_samples=4, num_qvalue_nets=2, hidden=64, dataset_size=20_000, progress=True
):
    """BDPO on the bandit whose data are the pretrained model's samples and their queried rewards."""
    with torch.no_grad():
        actions = pretrained.sample_path(torch.zeros(dataset_size, 1)).action
        rewards = reward(actions)  # queried once: no gradient ever flows through the reward
    policy = copy.deepcopy(pretrained)
    loss = BDPOLoss(
        policy,
        pretrained,
        make_value_operator(1, 2, hidden=hidden, num_steps=pretrained.num_steps),
        make_qvalue_operator(1, 2, hidden=hidden),
        eta=eta,
        rho=0.0,
        num_qvalue_nets=num_qvalue_nets,
        num_samples=num_samples,
        train_behavior=False,
    )
    critic_up = TargetSoftUpdate(loss, ("qvalue_network", "value_network"), tau=0.05)
    actor_up = TargetSoftUpdate(loss, ("actor_network",), tau=0.005)
    critic_optim = torch.optim.Adam([*loss.qvalue_network_params.parameters(), *loss.value_network_params.parameters()], lr=1e-3)
    actor_optim = torch.optim.Adam(loss.actor_network_params.parameters(), lr=3e-4)
    ones = torch.ones(batch, 1, dtype=torch.bool)
    warmup = steps // 5

    def descend(optimizer, objective, target_updater):
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
        target_updater.step()

    bar = trange(steps, desc="fine-tune (black-box)", disable=not progress)
    for step in bar:
        idx = torch.randint(0, dataset_size, (batch,))
        data = TensorDict(
            {
                "observation": torch.zeros(batch, 1),
                "action": actions[idx],
                ("next", "observation"): torch.zeros(batch, 1),
                ("next", "reward"): rewards[idx].unsqueeze(-1),
                ("next", "terminated"): ones,
                ("next", "done"): ones,
            },
            [batch],
        )
        q_loss, _ = loss.qvalue_loss(data)
        v_loss, meta = loss.value_loss(data)
        descend(critic_optim, q_loss + v_loss, critic_up)
        if step >= warmup and step % 2 == 0:
            descend(actor_optim, loss.actor_loss(data)[0], actor_up)
        if step % 50 == 0:
            bar.set_postfix(v=f"{meta['value_pred'].item():.3f}")
    return policy


@torch.no_grad()
def evaluate(models: dict, pretrained, reward=tilt_reward, eta=0.5, num=3000, seed=0):
    """MMD^2 to p* and mean reward of each model, of the pretrained model and of p*."""
    g = torch.Generator().manual_seed(seed)
    ref = pretrained.sample_path(torch.zeros(20_000, 1)).action
    r_ref = reward(ref)
    p_star = sample_optimal_policy(ref, r_ref, eta, num, generator=g)
    result = {
        "p_star": {"reward": reward(p_star).mean().item()},
        "pretrained": {"reward": r_ref.mean().item(), "mmd2_to_p_star": mmd_rbf(ref[:num], p_star).item()},
        "optimal_value": optimal_value(r_ref, eta),
    }
    samples = {"pretrained": ref[:num], "p_star": p_star}
    for name, model in models.items():
        s = model.sample_path(torch.zeros(num, 1)).action
        samples[name] = s
        result[name] = {"reward": reward(s).mean().item(), "mmd2_to_p_star": mmd_rbf(s, p_star).item()}
    return result, samples


def plot(samples: dict, result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(samples)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4.5), sharex=True, sharey=True)
    for ax, name in zip(axes, names):
        s = samples[name]
        ax.scatter(*s.T, s=2, alpha=0.4, color={"p_star": "C3", "pretrained": "C0"}.get(name, "C2"))
        info = result.get(name, {})
        title = name
        if "reward" in info:
            title += f"\nE r = {info['reward']:.3f}"
        if "mmd2_to_p_star" in info:
            title += f", MMD² to p* = {info['mmd2_to_p_star']:.4f}"
        ax.set_title(title, fontsize=9)
        ax.set_aspect("equal")
        ax.set_xlim(-4.5, 4.5)
        ax.set_ylim(-4.5, 4.5)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="8gaussians")
    p.add_argument("--eta", type=float, default=0.5)
    p.add_argument("--num-steps", type=int, default=10, help="diffusion steps N")
    p.add_argument("--pretrain-steps", type=int, default=2000)
    p.add_argument("--differentiable-steps", type=int, default=300)
    p.add_argument("--blackbox-steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("kl_finetune_2d.png"))
    args = p.parse_args(argv)
    if args.eta <= 0:
        p.error(f"--eta={args.eta}: expected a positive KL weight")
    warnings.filterwarnings("ignore", message="No target network updater")
    pretrained = pretrain(args.dataset, args.num_steps, args.pretrain_steps, seed=args.seed)
    models = {
        "differentiable": finetune_differentiable(pretrained, eta=args.eta, steps=args.differentiable_steps),
        "blackbox": finetune_blackbox(pretrained, eta=args.eta, steps=args.blackbox_steps),
    }
    result, samples = evaluate(models, pretrained, eta=args.eta, seed=args.seed)
    plot(samples, result, args.out)
    print(json.dumps(result, indent=2))
    print(f"figure written to {args.out}")
    return result


if __name__ == "__main__":
    main()
