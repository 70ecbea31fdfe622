"""Post-hoc probes of a ``bdpo_online.py`` checkpoint: which actor acts, and where V and the actor are trained.

    python benchmarks/online_checkpoint_probe.py outputs/online_vs_sac/bdpo_seed0 [more runs] --out probe.json

For each run folder (its ``config.yaml`` and ``checkpoint.pt``):

- ``acting``: the return of ``--episodes`` evaluation episodes (the run's evaluation start
  states) acting with the EMA target actor, as the run does, and with the online actor; each
  with best-of-K by target Q (``DETERMINISTIC``) and with one sample (``RANDOM``); with the
  episodes' lengths and the mean reward per step (on Hopper and Walker2d, ~1 per step for
  the whole time limit is the alive bonus of a policy that stands still).
- ``value_chain``: at ``--states`` replay states (drawn from the whole replay and from its last
  ``--recent`` transitions), per diffusion step ``n``, V's error against its one-step target
  ``E V_{n-1}(s, a^{n-1}) - eta l_n`` (docs/design.md: the quantity V's loss fits) and the online
  actor's gain in that one-step objective over the target actor's (what one more actor update
  could still find), at two kinds of ``a^n``:

  - ``data``: the replay's actions noised to step ``n``, where the losses train V and the actor
    (the paper's choice);
  - ``policy``: step ``n`` of the target actor's own reverse chain at the same states, where the
    acting policy's chain goes.

  The two share the states and the steps ``n``; target and gain share the ``a^{n-1}`` draws.
- ``policy_shift``: at ``--states`` replay states (the same two draws), how far the target
  actor's actions are from the actions the replay holds there (drawn by the older policies that
  collected it) against how far two of its own samples are from each other; target Q's gain of
  its action over the replay's (what the actor believes it has gained on the states Q was
  trained on); the critics' spread at each; and each one's mean action.

If V or the actor were poorly trained where the policy's own chain goes (online, the replay's
actions come from ever older policies), the ``policy`` errors and gains would stand out from the
``data`` ones. If a collapsed checkpoint had moved onto Q's errors at the replay's states, its
``policy_shift`` distance and Q gain would stand out from a healthy checkpoint's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torchrl_bdpo.provenance import run_record

SCRIPT_DIR = Path(__file__).resolve().parents[1] / "sota-implementations" / "bdpo"


def own_chain_steps(loss, observation: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``a^n`` of the target actor's reverse chain at ``observation``, step ``n[i]`` for row ``i``."""
    actor = loss.actor_network
    with torch.no_grad(), loss.target_actor_network_params.to_module(actor, preserve_module_state=False):
        path = actor.sample_path(observation, num_samples=1)
    actions = path.actions.squeeze(-2)  # [N + 1, B, A]
    index = n.reshape(1, -1, 1).expand(1, n.numel(), actions.shape[-1])
    return actions.gather(0, index).squeeze(0)


def step_errors(loss, observation: torch.Tensor, action_n: torch.Tensor, n: torch.Tensor, seed: int) -> dict:
    """Per step ``n``: V's error against its one-step target, and the online actor's gain over the target actor's."""
    with torch.no_grad():
        torch.manual_seed(seed)
        target, _, _ = loss.one_step_objective(observation, action_n, n)
        torch.manual_seed(seed)  # the same a^{n-1} draws under the online actor
        online, _, _ = loss.one_step_objective(observation, action_n, n, loss.actor_network_params)
        pred = loss._value(loss.value_network_params, observation, action_n, n).mean(0)
    out = {}
    for k in range(1, loss.actor_network.num_steps + 1):
        m = n == k
        err = pred[m] - target[m]
        out[f"n{k}"] = {
            "rows": int(m.sum()),
            "v_rms_error": float(err.pow(2).mean().sqrt()),
            "v_bias": float(err.mean()),
            "target": float(target[m].mean()),
            "online_actor_gain": float((online[m] - target[m]).mean()),
            "mean_abs_action": float(action_n[m].abs().mean()),
        }
    return out


def replay_draws(data, states: int, recent: int, seed: int):
    """``(where, observation, action)`` at ``states`` rows drawn from the whole replay and from its
    last ``recent`` transitions; the same rows for the same ``seed``."""
    g = torch.Generator().manual_seed(seed)
    for where, low in (("replay", 0), ("recent", max(len(data) - recent, 0))):
        idx = torch.randint(low, len(data), (states,), generator=g)
        yield where, data["observation"][idx].float(), data["action"][idx].float()


def value_chain(loss, data, states: int, recent: int, seed: int) -> dict:
    out = {}
    for where, obs, act in replay_draws(data, states, recent, seed):
        torch.manual_seed(seed)
        noised, n, _ = loss.actor_network.schedule.noise_action(act)
        torch.manual_seed(seed + 1)
        chain = own_chain_steps(loss, obs, n)
        out[where] = {"data": step_errors(loss, obs, noised, n, seed + 2), "policy": step_errors(loss, obs, chain, n, seed + 2)}
    return out


def shift_at(loss, observation: torch.Tensor, action: torch.Tensor, seed: int) -> dict:
    """The target actor's samples at ``observation`` against the replay's ``action`` there (module doc)."""
    actor = loss.actor_network
    with torch.no_grad():
        torch.manual_seed(seed)
        with loss.target_actor_network_params.to_module(actor, preserve_module_state=False):
            samples = actor.sample_path(observation, num_samples=2).actions[0]  # a^0: [B, 2, A]
        mine, other = samples.unbind(-2)
        q_mine = loss._qvalue(loss.target_qvalue_network_params, observation, mine)  # [K, B]
        q_replay = loss._qvalue(loss.target_qvalue_network_params, observation, action)
    return {
        "to_replay": float((mine - action).norm(dim=-1).mean()),
        "to_itself": float((mine - other).norm(dim=-1).mean()),
        "q_policy": float(q_mine.mean()),
        "q_replay": float(q_replay.mean()),
        "q_gain": float((q_mine.mean(0) - q_replay.mean(0)).mean()),
        "critic_std_policy": float(q_mine.std(0, unbiased=False).mean()),
        "critic_std_replay": float(q_replay.std(0, unbiased=False).mean()),
        "mean_action_policy": mine.mean(0).tolist(),
        "mean_action_replay": action.mean(0).tolist(),
    }


def policy_shift(loss, data, states: int, recent: int, seed: int) -> dict:
    return {where: shift_at(loss, obs, act, seed + 3) for where, obs, act in replay_draws(data, states, recent, seed)}


def acting(loss, cfg, episodes: int, seed: int) -> dict:
    sys.path.insert(0, str(SCRIPT_DIR))
    import bdpo_online as online
    from torchrl.envs.utils import ExplorationType
    from utils import selection_kwargs

    from torchrl_bdpo.envs import eval_seed, evaluate

    env = online.make_train_env(cfg.env.name, eval_seed(cfg.seed))
    out = {}
    for who, params in (("target_actor", loss.target_actor_network_params), ("actor", loss.actor_network_params)):
        module = loss.make_acting_module(num_candidates=cfg.eval.num_candidates, actor_params=params, **selection_kwargs(cfg))
        for mode, exploration in (("best_of_k", ExplorationType.DETERMINISTIC), ("one_sample", ExplorationType.RANDOM)):
            torch.manual_seed(seed)
            returns, kept = evaluate(env, module, episodes, cfg.eval.max_steps, exploration, keep_episodes=True, seed=eval_seed(cfg.seed))
            out[f"{who}/{mode}"] = {
                "returns": [float(r) for r in returns],
                "mean": float(returns.mean()),
                "lengths": [int(e.shape[0]) for e in kept],
                # Hopper and Walker2d pay 1 per step alive: ~1 per step is standing, not a gait
                "reward_per_step": float(sum(float(e["next", "reward"].sum()) for e in kept) / sum(e.shape[0] for e in kept)),
            }
    env.close()
    return out


def analyse(run: Path, episodes: int, states: int, recent: int, seed: int) -> dict:
    sys.path.insert(0, str(SCRIPT_DIR))
    from utils import load_online_run

    cfg, loss, state = load_online_run(run)
    data = state["replay"]["data"]
    row = {"run": str(run), "frames": state["frames"], "eta": float(loss.eta), "replay": len(data)}
    row["value_chain"] = value_chain(loss, data, states, recent, seed)
    row["policy_shift"] = policy_shift(loss, data, states, recent, seed)
    if episodes > 0:
        row["acting"] = acting(loss, cfg, episodes, seed)
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="bdpo_online.py output folders")
    p.add_argument("--episodes", type=int, default=10, help="evaluation episodes per actor and mode (0: no acting probe)")
    p.add_argument("--states", type=int, default=4096, help="replay states per draw")
    p.add_argument("--recent", type=int, default=5000, help="the second draw's window: this many latest transitions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON out")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [analyse(r, args.episodes, args.states, args.recent, args.seed) for r in args.runs]
    for r in rows:
        print(f"{r['run']} ({r['frames']} frames, eta {r['eta']:.3g}):")
        for where, kinds in r["value_chain"].items():
            for kind, steps in kinds.items():
                cells = " ".join(f"{k}: {v['v_rms_error']:.2f}/{v['target']:.1f}/{v['online_actor_gain']:+.3f}" for k, v in steps.items())
                print(f"  V error / target / actor gain, {where}, a^n from {kind}: {cells}")
        for where, x in r["policy_shift"].items():
            print(
                f"  policy shift, {where}: to the replay's actions {x['to_replay']:.3f} (own spread {x['to_itself']:.3f}), "
                f"Q gain {x['q_gain']:+.2f} on {x['q_replay']:.1f}, critic std {x['critic_std_policy']:.2f} / {x['critic_std_replay']:.2f}"
            )
        for name, x in r.get("acting", {}).items():
            print(f"  {name}: {x['mean']:.1f} (lengths {min(x['lengths'])}-{max(x['lengths'])}, {x['reward_per_step']:.3f} per step)")
    if args.out is not None:
        args.out.write_text(json.dumps(run_record(args, runs=rows), indent=2))
    return rows


if __name__ == "__main__":
    main()
