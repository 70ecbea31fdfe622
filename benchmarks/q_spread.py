"""What the lower bound in the Q target costs: the Q ensemble's spread against the reward per step.

    python benchmarks/q_spread.py outputs/bdpo/hopper-medium/seed0 outputs/bdpo/walker2d-medium/seed0

For each finished ``bdpo_offline.py`` run, on ``--pairs`` dataset transitions drawn from its own
buffer (scaled rewards, as training sees them), with the run's final target networks:

- ``q_data``: the target Q ensemble's mean on the data's ``(s, a)``, and ``spread_data``, the
  members' population std there (mean over the pairs);
- ``spread_next``: the members' std of ``mean_M Q_k(s', a')`` (``max_M`` with ``loss.max_q_backup``,
  as the Q target reduces them) at the target actor's ``M`` actions for the non-terminal next
  states, the quantity whose ``rho x`` the Q target subtracts;
- ``spread_q_corr``: the correlation, over those next states, of the members' std with their mean
  Q, and ``spread_per_q``, the mean std over the mean |Q| there: where the spread grows with Q, a
  lower bound ``rho x std`` takes a share of Q itself, as a shorter horizon would;
- ``spread_actor_same`` / ``spread_behavior_same``: the members' std at ``M`` actions of the
  target actor / of the behavior EMA at the data's own states ``s`` (mean over the states and
  actions), next to ``spread_data`` at the data's action there, with ``q_actor_same`` /
  ``q_behavior_same`` the members' mean Q at those actions, and ``frac_actor_below_data`` the
  share of states where the actor's actions have a smaller spread than the data's action: an
  ensemble whose spread grows off the data gives a lower bound that holds the actor near it;
  one whose spread is smaller at the actor's actions than at the data's pulls it away;
- ``reward``: the mean reward per transition (``reward_abs``: of its magnitude);
- ``spread_per_reward = spread_next / reward``: what one unit of ``rho`` in the Q target would cost;
- ``cost_ratio = gamma x rho_Q x spread_next / reward``, with ``rho_Q`` the Q target's LCB weight
  (``loss.qvalue_target_rho``, else ``loss.rho``; with ``loss.qvalue_target_pessimism`` the weight
  that rule sets on these pairs, whose cost ratio is then the share). With a steady spread the Q target's fixed point
  is ``(reward - gamma rho_Q spread) / (1 - gamma)`` (docs/design.md, "Pessimism in the Q
  target"): at a ratio of 1 nothing is left of Q but the episode's end.

Out: a Markdown table on stdout; with ``--out``, a JSON of every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from torchrl_bdpo.ensemble import adaptive_lcb_weight
from torchrl_bdpo.provenance import run_record

SCRIPT_DIR = Path(__file__).resolve().parents[1] / "sota-implementations" / "bdpo"


def spread_of_run(run: Path, pairs: int, seed: int) -> dict:
    sys.path.insert(0, str(SCRIPT_DIR))
    from utils import load_offline_run

    cfg, buffer, loss, _ = load_offline_run(run, batch_size=pairs)
    torch.manual_seed(seed)
    batch = buffer.sample()
    keys = loss.tensor_keys
    obs, action = batch.get(keys.observation), batch.get(keys.action)
    reward = batch.get(("next", keys.reward)).reshape(-1)
    live = ~batch.get(("next", keys.terminated)).reshape(-1).bool()
    next_obs = batch.get(("next", keys.observation))[live]
    M = loss.num_samples
    actor = loss.actor_network
    with torch.no_grad():
        q = loss._qvalue(loss.target_qvalue_network_params, obs, action).reshape(loss.num_qvalue_nets, -1)
        with loss.target_actor_network_params.to_module(actor, preserve_module_state=False):
            path = actor.sample_path(next_obs, num_samples=M)
        obs_m = next_obs.unsqueeze(-2).expand(*next_obs.shape[:-1], M, next_obs.shape[-1])
        q_next = loss._qvalue(loss.target_qvalue_network_params, obs_m, path.action)  # [K, rows, M]
        q_next = (q_next.max(-1).values if loss.max_q_backup else q_next.mean(-1)).reshape(loss.num_qvalue_nets, -1)
        # the same states, three sources of actions: the data's, the actor's and the behavior's
        same = {}
        obs_s = obs.unsqueeze(-2).expand(*obs.shape[:-1], M, obs.shape[-1])
        for name, net, params in (("actor", actor, loss.target_actor_network_params), ("behavior", loss.behavior_network, loss.target_behavior_network_params)):
            with params.to_module(net, preserve_module_state=False):
                acts = net.sample_path(obs, num_samples=M).action
            same[name] = loss._qvalue(loss.target_qvalue_network_params, obs_s, acts)  # [K, rows, M]
    std_next, mean_next = q_next.std(0, correction=0), q_next.mean(0)
    spread_next = float(std_next.mean())
    spread_q_corr = float(torch.corrcoef(torch.stack([std_next, mean_next]))[0, 1]) if std_next.numel() > 1 else float("nan")
    share = loss.qvalue_target_pessimism
    if share is None:
        rho_q = float(loss.qvalue_target_rho)
    else:  # the weight the loss sets, on these pairs
        rho_q = float(adaptive_lcb_weight(std_next, reward, loss.gamma, share))
    mean_reward = float(reward.mean())
    spread_per_reward = spread_next / mean_reward if mean_reward > 0 else float("nan")
    spread_data_rows = q.std(0, correction=0)
    spread_same = {k: v.std(0, correction=0) for k, v in same.items()}  # [rows, M]
    return {
        "run": str(run),
        "dataset": str(cfg.env.dataset),
        "rho": float(loss.rho),
        "rho_q": rho_q,
        "qvalue_target_pessimism": share,
        "gamma": float(loss.gamma),
        "pairs": int(reward.numel()),
        "q_data": float(q.mean()),
        "spread_data": float(spread_data_rows.mean()),
        "spread_actor_same": float(spread_same["actor"].mean()),
        "spread_behavior_same": float(spread_same["behavior"].mean()),
        "q_actor_same": float(same["actor"].mean()),
        "q_behavior_same": float(same["behavior"].mean()),
        "frac_actor_below_data": float((spread_same["actor"].mean(-1) < spread_data_rows).float().mean()),
        "spread_next": spread_next,
        "spread_q_corr": spread_q_corr,
        "spread_per_q": spread_next / float(mean_next.abs().mean()),
        "reward": mean_reward,
        "reward_abs": float(reward.abs().mean()),
        "spread_per_reward": spread_per_reward,
        "cost_ratio": loss.gamma * rho_q * spread_per_reward,
    }


def table(rows: list[dict]) -> str:
    head = "| run | rho (Q target) | Q on data | spread, data | spread, actor at s / behavior at s | spread, next actions | corr(spread, Q) "
    head += "| reward per step | spread / reward | gamma rho spread / reward |"
    lines = [head, "| " + " | ".join(["---"] * 10) + " |"]
    for r in rows:
        cells = (f"{r['rho']:g} ({r['rho_q']:.3g})", f"{r['q_data']:.1f}", f"{r['spread_data']:.3f}")
        cells += (f"{r['spread_actor_same']:.3f} / {r['spread_behavior_same']:.3f}", f"{r['spread_next']:.3f}", f"{r['spread_q_corr']:.2f}")
        cells += (f"{r['reward']:.3f}", f"{r['spread_per_reward']:.2f}", f"{r['cost_ratio']:.2f}")
        lines.append(f"| {r['run']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="bdpo_offline.py output folders (config.yaml, checkpoint.pt)")
    p.add_argument("--pairs", type=int, default=2048, help="dataset transitions per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON out")
    args = p.parse_args(argv)
    if args.pairs < 1:
        raise ValueError(f"--pairs={args.pairs}: expected >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = [spread_of_run(run, args.pairs, args.seed) for run in args.runs]
    print(table(rows))
    if args.out is not None:
        args.out.write_text(json.dumps(run_record(args, seconds=time.perf_counter() - t0, runs=rows), indent=2))
    return rows


if __name__ == "__main__":
    main()
