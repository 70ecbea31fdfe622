"""How spread out a trained diffusion policy's actions are, against its path KL to the reference.

    python benchmarks/action_entropy.py outputs/online_vs_sac/bdpo_seed0 [more runs] --out actions.json

For each ``bdpo_online.py`` run folder (its ``config.yaml`` and ``checkpoint.pt``), at
``--states`` observations drawn from the last ``--recent`` transitions of the run's replay, and
for the actor and its EMA target (the acting policy), from ``--samples`` actions per state:

- ``path_kl``: the mean path KL to the run's reference, ``sum_n l_n`` (docs/design.md), the
  quantity eta weighs and automatic eta steers;
- ``edge_share``: the share of action coordinates on the box's boundary (``|a| >= 1 - 1e-6``),
  where ``clip_denoised`` puts them, and ``corner_share``, the share of actions with every
  coordinate there (atoms: a distribution with them has no density, its KL to the uniform
  policy is infinite);
- ``interior_entropy``: the k-nearest-neighbour entropy (``torchrl_bdpo.metrics.knn_entropy``)
  of the actions strictly inside the box, and ``interior_kl_uniform`` = ``d log 2`` minus it:
  what the KL to U[-1, 1]^d would be if every action were like those.

With ``diffusion.final_noise=false`` (the default) the last reverse step adds no noise, so the
sampled action is a deterministic, clipped function of ``a^1``, while the path KL counts ``l_1``
with variance ``sigma_1^2``: then the path KL bounds nothing about the actions' spread, which
these numbers measure. For comparison, SAC at its target entropy ``-d`` (tanh-Gaussian) is at
KL ``d (log 2 + 1)`` to U[-1, 1]^d.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from torchrl_bdpo.metrics import knn_entropy
from torchrl_bdpo.objectives.denoising import predict_eps_with
from torchrl_bdpo.objectives.pathwise_kl import path_step_inputs
from torchrl_bdpo.provenance import run_record

SCRIPT_DIR = Path(__file__).resolve().parents[1] / "sota-implementations" / "bdpo"


def policy_spread(loss, params, states: torch.Tensor, samples: int, kl_paths: int = 64) -> dict:
    """The statistics of the module docstring for the policy with ``params`` at ``states``."""
    actor = loss.actor_network
    d = actor.action_dim
    edge, corner, interior_h, interior_share = [], [], [], []
    with torch.no_grad(), params.to_module(actor, preserve_module_state=False):
        for s in states:
            a = actor.sample_path(s.unsqueeze(0), num_samples=samples).action[0]
            at_edge = a.abs() >= 1 - 1e-6
            edge.append(at_edge.float().mean().item())
            corner.append(at_edge.all(-1).float().mean().item())
            inside = a[~at_edge.any(-1)]
            interior_share.append(len(inside) / samples)
            if len(inside) > 10:
                interior_h.append(knn_entropy(inside).item())
        path = actor.sample_path(states, num_samples=kl_paths)
        obs = states.unsqueeze(-2).expand(len(states), kl_paths, states.shape[-1])
        actions, steps, obs_n = path_step_inputs(obs, path)
        eps_ref = predict_eps_with(loss.behavior_network, loss.target_behavior_network_params, actions, steps, obs_n)
        path_kl = actor.schedule.step_kl(path.eps, eps_ref, steps).sum(0).mean().item()
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    h = mean(interior_h)
    return {
        "path_kl": path_kl,
        "edge_share": mean(edge),
        "corner_share": mean(corner),
        "interior_share": mean(interior_share),
        "interior_entropy": h,
        "interior_kl_uniform": None if h is None else d * math.log(2) - h,
    }


def analyse(run: Path, states: int, recent: int, samples: int, seed: int) -> dict:
    sys.path.insert(0, str(SCRIPT_DIR))
    from utils import load_online_run

    cfg, loss, state = load_online_run(run)
    data = state["replay"]["data"]
    obs, action_dim = data["observation"].float(), data["action"].shape[-1]
    g = torch.Generator().manual_seed(seed)
    window = min(recent, len(obs))
    picks = len(obs) - 1 - torch.randperm(window, generator=g)[:states]
    torch.manual_seed(seed)
    s = obs[picks]
    return {
        "run": str(run),
        "frames": state["frames"],
        "eta": state.get("eta_value"),
        "final_noise": bool(cfg.diffusion.final_noise),
        "clip_denoised": bool(cfg.diffusion.clip_denoised),
        "actor": policy_spread(loss, loss.actor_network_params, s, samples),
        "target_actor": policy_spread(loss, loss.target_actor_network_params, s, samples),
        "sac_target_kl_uniform": action_dim * (math.log(2) + 1),
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="bdpo_online.py output folders")
    p.add_argument("--states", type=int, default=32)
    p.add_argument("--recent", type=int, default=10000, help="draw the states from this many latest transitions")
    p.add_argument("--samples", type=int, default=4000, help="actions per state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON out")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [analyse(r, args.states, args.recent, args.samples, args.seed) for r in args.runs]
    for r in rows:
        print(f"{r['run']} ({r['frames']} frames, eta {r['eta']:.3g}):")
        for who in ("actor", "target_actor"):
            x = r[who]
            kl = "n/a" if x["interior_kl_uniform"] is None else f"{x['interior_kl_uniform']:.2f}"
            print(
                f"  {who}: path KL {x['path_kl']:.2f}; coordinates at the edge {x['edge_share']:.3f}, actions at a corner "
                f"{x['corner_share']:.3f}; interior ({x['interior_share']:.3f} of actions) KL to uniform {kl} "
                f"(SAC at its target entropy: {r['sac_target_kl_uniform']:.2f})"
            )
    if args.out is not None:
        args.out.write_text(json.dumps(run_record(args, runs=rows), indent=2))
    return rows


if __name__ == "__main__":
    main()
