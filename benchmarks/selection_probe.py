"""How best-of-K should rank its candidates: a finished ``bdpo_offline.py`` run evaluated under several rules.

    python benchmarks/selection_probe.py outputs/bdpo/hopper-medium/seed0 outputs/bdpo/hopper-medium/seed1
    python benchmarks/selection_probe.py RUN --rules one mean/10 lcb-2/10 min/10 mean/3 --candidates actor behavior

A rule is ``one`` (one sample, no selection: ``ExplorationType.RANDOM``),
``<aggregation>[-<rho>]/<K>``: K candidates, the argmax of the Q ensemble's ``mean`` (the paper),
``min`` or ``lcb`` (mean - rho x std), as ``eval.aggregation`` / ``eval.rho`` /
``eval.num_candidates`` set it in the scripts, ``avg/<K>``: the mean of K candidates, Q unused
(``eval.selection=average``), or ``elite<M>/<K>``: the mean of the M of K candidates with the best
ensemble-mean Q (``eval.selection=elite eval.num_elite=M``). Candidates come from the target actor, the
behavior model's EMA, or ``pooled``: K from each, 2K ranked together (rules that rank by Q only; the
JSON then holds the share of picks that were the actor's, ``actor_pick_fraction``); Q is the run's
target ensemble. Every rule of a run starts its
episodes from the same initial states (the run's evaluation env, reseeded with the run's
evaluation seed before each rule; ``torch.manual_seed(--seed)`` for the candidates' draws). Per episode: return, length and discounted
return (the run's gamma, raw rewards).

Out: a Markdown table on stdout; with ``--out``, a JSON of every run and rule; with ``--plot``,
a bar chart of each run's returns by rule next to the data's mean return.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from torchrl_bdpo.ensemble import AGGREGATIONS
from torchrl_bdpo.provenance import run_record

SCRIPT_DIR = Path(__file__).resolve().parents[1] / "sota-implementations" / "bdpo"
RULE = re.compile(r"^(?P<agg>[a-z]+)(?:-(?P<rho>[0-9.]+))?/(?P<k>[0-9]+)$")
ELITE = re.compile(r"^elite(?P<m>[0-9]+)/(?P<k>[0-9]+)$")


def parse_rule(text: str) -> dict:
    """``"one"``, ``"<aggregation>[-<rho>]/<K>"``, ``"avg/<K>"`` or ``"elite<M>/<K>"`` ->
    ``{"name", "num_candidates", "aggregation", "rho", "selection", "num_elite"}``."""
    rule = {"name": text, "aggregation": "mean", "rho": 0.0, "selection": "q", "num_elite": None}
    if text == "one":
        return {**rule, "num_candidates": 1}
    e = ELITE.match(text)
    if e is not None and 1 <= int(e["m"]) <= int(e["k"]):
        return {**rule, "num_candidates": int(e["k"]), "selection": "elite", "num_elite": int(e["m"])}
    m = RULE.match(text)
    if m is not None and m["agg"] == "avg" and m["rho"] is None and int(m["k"]) >= 1:
        return {**rule, "num_candidates": int(m["k"]), "selection": "average"}
    if m is None or m["agg"] not in AGGREGATIONS or int(m["k"]) < 1 or (m["rho"] is not None and m["agg"] != "lcb"):
        raise ValueError(
            f"rule {text!r}: expected 'one', 'avg/<K>', 'elite<M>/<K>' (1 <= M <= K) or '<aggregation>[-<rho>]/<K>' with "
            f"aggregation in {AGGREGATIONS}, rho only for lcb and K >= 1 (e.g. mean/10, lcb-2/10, min/3, avg/10, elite3/10)"
        )
    return {**rule, "num_candidates": int(m["k"]), "aggregation": m["agg"], "rho": float(m["rho"] or 0.0)}


CANDIDATES = ("actor", "behavior", "pooled")


def pooled_select(actor, actor_params, behavior, behavior_params, **kwargs):
    """A ``QSelectActor`` whose candidates are ``num_candidates`` of the actor's and as many of the
    behavior's, ranked together by Q; ``.picks`` counts the chosen candidates (``[actor's, all]``)."""
    from torchrl_bdpo.diffusion import QSelectActor

    class PooledQSelect(QSelectActor):
        def candidates(self, observation):
            own = super().candidates(observation)
            with behavior_params.to_module(behavior, preserve_module_state=False):
                return torch.cat([own, behavior.sample_path(observation, num_samples=self.num_candidates).action], -2)

        def rank(self, observation, candidates):
            q = super().rank(observation, candidates)
            top = q.topk(self.num_elite or 1, dim=-1).indices
            self.picks += torch.tensor([(top < self.num_candidates).sum().item(), top.numel()])
            return q

    policy = PooledQSelect(actor, actor_params=actor_params, **kwargs)
    policy.picks = torch.zeros(2, dtype=torch.long)
    return policy


def check_pooled_rules(rules: list[dict], candidates: list[str]) -> None:
    """``pooled`` ranks two sources' candidates by Q: a rule that does not rank is refused."""
    unranked = [r["name"] for r in rules if r["name"] == "one" or r["selection"] == "average"]
    if "pooled" in candidates and unranked:
        raise ValueError(
            f"--candidates pooled with rules {unranked}: a pool of the actor's and the behavior's candidates is only ranked by Q; "
            "drop these rules or probe them with --candidates actor behavior"
        )


def probe_run(run: Path, rules: list[dict], candidates: list[str], episodes: int, seed: int) -> dict:
    sys.path.insert(0, str(SCRIPT_DIR))
    from torchrl.envs.utils import ExplorationType
    from utils import load_offline_run

    from torchrl_bdpo.data import episode_returns
    from torchrl_bdpo.diffusion import QSelectActor
    from torchrl_bdpo.envs import episode_stats, eval_env_id, eval_seed, evaluate, make_eval_env

    cfg, buffer, loss, state = load_offline_run(run)
    info = buffer.dataset_info
    data_return = None
    if info.reward_scale:  # the data's mean episode return, in the env's raw rewards
        data_return = float((episode_returns(buffer.storage[: len(buffer)]) / info.reward_scale).mean())
    env_seed = eval_seed(cfg.seed)  # the run's evaluation env seed
    env = make_eval_env(eval_env_id(info, cfg.env.get("eval_env")), cfg.eval.num_envs, env_seed, "cpu", info.action_scaling())
    sources = {"actor": (loss.actor_network, loss.target_actor_network_params), "behavior": (loss.behavior_network, loss.target_behavior_network_params)}
    rows = []
    for who in candidates:
        for rule in rules:
            kwargs = dict(
                qvalue_network=loss.qvalue_network,
                qvalue_params=loss.target_qvalue_network_params,
                num_qvalue_nets=loss.num_qvalue_nets,
                num_candidates=rule["num_candidates"],
                aggregation=rule["aggregation"],
                rho=rule["rho"],
                selection=rule["selection"],
                num_elite=rule["num_elite"],
            )
            if who == "pooled":
                policy = pooled_select(*sources["actor"], *sources["behavior"], **kwargs)
            else:
                network, params = sources[who]
                policy = QSelectActor(network, actor_params=params, **kwargs)
            exploration = ExplorationType.RANDOM if rule["name"] == "one" else ExplorationType.DETERMINISTIC
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            returns, eps = evaluate(env, policy, episodes, cfg.eval.max_steps, exploration, keep_episodes=True, seed=env_seed)  # same start states
            stats = episode_stats(eps, cfg.loss.gamma)
            rows.append(
                {
                    "candidates": who,
                    **rule,
                    "return_mean": float(returns.mean()),
                    "return_std": float(returns.std()),
                    "returns": returns.tolist(),
                    **{f"{k}_mean": v for k, v in stats.items()},
                    "seconds": time.perf_counter() - t0,
                    **({"actor_pick_fraction": policy.picks[0].item() / policy.picks[1].item()} if who == "pooled" else {}),
                }
            )
    env.close()
    return {"run": str(run), "phase": state.get("phase"), "step": state.get("step"), "dataset": cfg.env.dataset, "dataset_return": data_return, "rules": rows}


def cell(row: dict) -> str:
    text = f"{row['return_mean']:.0f} +- {row['return_std']:.0f} ({row['length_mean']:.0f})"
    return text + (f", actor's {row['actor_pick_fraction']:.0%}" if "actor_pick_fraction" in row else "")


def table(results: list[dict]) -> str:
    names = [r["name"] for r in results[0]["rules"] if r["candidates"] == results[0]["rules"][0]["candidates"]]
    lines = ["| run | candidates | " + " | ".join(names) + " |", "| --- | --- |" + " --- |" * len(names)]
    for res in results:
        for who in dict.fromkeys(r["candidates"] for r in res["rules"]):
            cells = [cell(r) for r in res["rules"] if r["candidates"] == who]
            lines.append(f"| {res['run']} | {who} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, episodes: int) -> Path:
    """Grouped bars: per run and candidate source, each rule's mean return (+- its standard error)
    and the data's mean return as a tick."""
    import numpy as np

    from torchrl_bdpo.plotting import finish, subplots

    groups = [(res, who) for res in results for who in dict.fromkeys(r["candidates"] for r in res["rules"])]
    names = list(dict.fromkeys(r["name"] for r in results[0]["rules"]))
    fig, (ax,) = subplots(width=max(6.5, 1.2 * len(groups) + 2))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        rows = [next(r for r in res["rules"] if r["candidates"] == who and r["name"] == name) for res, who in groups]
        x = np.arange(len(groups)) + (j - (len(names) - 1) / 2) * width
        ax.bar(x, [r["return_mean"] for r in rows], width, yerr=[r["return_std"] / np.sqrt(episodes) for r in rows], label=name, capsize=2)
    tops = [r["return_mean"] + r["return_std"] / np.sqrt(episodes) for res, _ in groups for r in res["rules"]]
    ax.set_ylim(0, 1.35 * max(tops + [1.0]))  # room above the bars for the legend
    for i, (res, _) in enumerate(groups):
        if res["dataset_return"] is not None:
            ax.hlines(res["dataset_return"], i - 0.45, i + 0.45, colors="k", linestyles="--", lw=1, label="data's mean return" if i == 0 else None)
    ax.set_xticks(np.arange(len(groups)), [f"{Path(res['run']).parent.name}\n{Path(res['run']).name}\n{who}" for res, who in groups], fontsize=7)
    return finish(fig, [(ax, "run, candidates", f"return ({episodes} episodes, +- s.e.)")], path, title="best-of-K rules", legend_size=7)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="bdpo_offline.py output folders (config.yaml, checkpoint.pt)")
    p.add_argument("--rules", nargs="+", default=["one", "mean/10", "lcb-1/10", "lcb-2/10", "min/10", "mean/3"])
    p.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=["actor"])
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON out")
    p.add_argument("--plot", type=Path, default=None, help="PNG out: each run's returns by rule")
    args = p.parse_args(argv)
    rules = [parse_rule(r) for r in args.rules]
    check_pooled_rules(rules, args.candidates)
    if args.episodes < 1:
        raise ValueError(f"--episodes={args.episodes}: expected >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = [probe_run(run, rules, args.candidates, args.episodes, args.seed) for run in args.runs]
    print(table(results) + "\n\ncells: return mean +- std over episodes (mean episode length)[, share of the pool's picks that were the actor's]")
    if args.out is not None:
        args.out.write_text(json.dumps(run_record(args, leave_out=("runs", "out", "plot"), seconds=time.perf_counter() - t0, runs=results), indent=2))
    if args.plot is not None:
        plot(results, args.plot, args.episodes)
    return results


if __name__ == "__main__":
    main()
