"""The offline robustness suite: datasets made here, BDPO's ``budget=cpu`` and TorchRL's peers on each.

    python benchmarks/robustness_suite.py generate --envs hopper --gen-seeds 0 1
    python benchmarks/robustness_suite.py run --envs hopper --gen-seeds 0 --seeds 0 1 --threads 1
    python benchmarks/robustness_suite.py report --out outputs/suite > suite.md

``generate`` makes the weak-medium, medium and medium-replay datasets of each task with
``make_dataset.py`` (one SAC run per task and generation seed; each level a rollout), as
``generated[-seed<k>]/<task>/<level>-v0`` (generation seed 0 keeps the plain prefix, which the
``task=generated-*`` configs read). ``run`` trains ``bdpo_offline.py task=generated-<task>-<level>
budget=cpu`` (plus ``--bdpo`` overrides) and ``offline_peers.py`` (IQL, CQL, TD3+BC, BC at the
same number of gradient steps) for every dataset and seed, each in its own process, skipping
what is finished and resuming what is not. ``report`` prints the Markdown table: per dataset,
the data's mean return, BDPO's final and best evaluations (mean +- std over seeds), the final
evaluation's actor one sample and behavior model (where the run logged them), whether
BDPO ended above the data and within 90% of its best in every seed, how many seeds ended below
90% of their best by more than the evaluations' noise (two standard errors of the difference, from
each evaluation's episode std and count), each peer's final return, and the wall time of
everything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "sota-implementations" / "bdpo"
ENV_IDS = {"hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "halfcheetah": "HalfCheetah-v5"}
LEVELS = ("weak-medium", "medium", "medium-replay")
KEEP_OF_BEST = 0.9  # the "no late collapse": the final evaluation at least this share of the best


def prefix(gen_seed: int) -> str:
    return "generated" if gen_seed == 0 else f"generated-seed{gen_seed}"


def datasets(args):
    for task in args.envs:
        for g in args.gen_seeds:
            for level in args.levels:
                yield task, g, level, f"{prefix(g)}/{task}/{level}-v0"


def run_job(cmd: list[str], threads: int | None, log: Path) -> int:
    """``cmd`` in a subprocess from the repository root, its output appended to ``log``; with
    ``threads``, its OpenMP / MKL threads and one inductor compile worker (jobs side by side)."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TORCHINDUCTOR_COMPILE_THREADS="1")
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(cmd), f"> {log}", flush=True)
    with open(log, "a") as f:
        return subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def generate(args) -> None:
    for task in args.envs:
        for g in args.gen_seeds:
            cmd = [
                sys.executable,
                str(SCRIPTS / "make_dataset.py"),
                f"env_id={ENV_IDS[task]}",
                f"levels=[{','.join(args.levels)}]",
                "hidden=128",
                f"seed={g}",
                f"dataset_prefix={prefix(g)}",
                f"out_dir={Path(args.out) / 'generator' / task / f'seed{g}'}",
                "progress=false",
            ]
            rc = run_job(cmd, args.threads, Path(args.out) / "logs" / f"generate-{task}-seed{g}.log")
            if rc:
                print(f"generation of {task} seed {g} failed (exit {rc}); see its log")


def run(args) -> None:
    out = Path(args.out)
    for task, g, level, dataset in datasets(args):
        for seed in args.seeds:
            name = f"{task}-{level}-gen{g}"
            run_dir = out / "bdpo" / name / f"seed{seed}"
            if not (run_dir / "summary.json").exists():
                cmd = [
                    sys.executable,
                    str(SCRIPTS / "bdpo_offline.py"),
                    f"task=generated-{task}-{level}",
                    "budget=cpu",
                    f"env.dataset={dataset}",
                    f"seed={seed}",
                    f"hydra.run.dir={run_dir}",
                    "checkpoint.resume=true",
                    *([f"threads={args.threads}"] if args.threads else []),
                    *args.bdpo,
                ]
                run_job(cmd, args.threads, out / "logs" / f"bdpo-{name}-seed{seed}.log")
            peers_dir = out / "peers" / name / f"seed{seed}"
            if not args.skip_peers and not (peers_dir / "peers.png").exists():
                cmd = [
                    sys.executable,
                    str(ROOT / "benchmarks" / "offline_peers.py"),
                    "--dataset",
                    dataset,
                    "--seeds",
                    str(seed),
                    "--steps",
                    str(args.steps),
                    "--out-dir",
                    str(peers_dir),
                    "--no-progress",
                ]
                run_job(cmd, args.threads, out / "logs" / f"peers-{name}-seed{seed}.log")


def _pm(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    return f"{np.mean(values):.0f} +- {np.std(values):.0f}" if len(values) > 1 else f"{values[0]:.0f}"


def below_best_beyond_noise(summary: dict) -> bool | None:
    """Whether the final evaluation is below 90% of the best by more than two standard errors of
    the difference (``None`` where the summary lacks the episode std or count). With 10 episodes
    and Hopper's episode std of 500-900 one evaluation's standard error is 150-300, so a final
    below 90% of the best is often within the noise; this separates a late collapse from it. It
    ignores that the best is the maximum of several noisy evaluations (which biases it upward), so
    it flags a collapse more readily than an exact test would."""
    final, best = summary["final"], summary["best"]
    episodes = summary.get("config", {}).get("eval", {}).get("episodes")
    if not episodes or "return_std" not in final or "return_std" not in best:
        return None
    se = np.hypot(final["return_std"], KEEP_OF_BEST * best["return_std"]) / np.sqrt(episodes)
    return bool(KEEP_OF_BEST * best["return_mean"] - final["return_mean"] > 2 * se)


def report(args) -> str:
    out = Path(args.out)
    rows, wall = [], 0.0
    for bdpo_dir in sorted((out / "bdpo").glob("*")):
        seeds = sorted(bdpo_dir.glob("seed*/summary.json"))
        unfinished = [p.parent.name for p in bdpo_dir.glob("seed*") if not (p / "summary.json").exists()]
        finals, bests, ok, data = [], [], [], None
        ones, behaviors = [], []  # the final evaluation's actor one sample and behavior model
        beyond = []  # below 90% of the best by more than the noise (None: not known)
        for path in seeds:
            s = json.loads(path.read_text())
            wall += s["wall_time_s"]
            data = s["dataset"]["mean_episode_return"]
            if s["final"] is None:
                continue
            final, best = s["final"]["return_mean"], s["best"]["return_mean"]
            finals.append(final)
            bests.append(best)
            ones.append(s["final"].get("return_one_sample_mean"))
            behaviors.append(s["final"].get("return_behavior_mean"))
            ok.append(final > data and final >= KEEP_OF_BEST * best)
            beyond.append(below_best_beyond_noise(s))
        peers = {}
        for path in sorted((out / "peers" / bdpo_dir.name).glob("seed*/peers.json")):
            p = json.loads(path.read_text())
            wall += sum(r["wall_s"] for runs in p["runs"].values() for r in runs.values())
            for algo, runs in p["runs"].items():
                peers.setdefault(algo, []).extend(r["evals"][-1]["mean"] for r in runs.values())
        cells = [
            bdpo_dir.name,
            "—" if data is None else f"{data:.0f}",
            _pm(finals),
            _pm(bests),
            _pm(ones),
            _pm(behaviors),
            f"{sum(ok)}/{len(ok)}" + (f" ({len(unfinished)} unfinished)" if unfinished else ""),
            "—" if None in beyond or not beyond else f"{sum(beyond)}/{len(beyond)}",
        ]
        cells += [_pm(peers.get(a, [])) for a in ("iql", "cql", "td3bc", "bc")]
        rows.append("| " + " | ".join(cells) + " |")
    head = (
        "| dataset | data mean return | BDPO final | BDPO best | BDPO actor one sample, final | behavior model, final "
        f"| above data and >= {KEEP_OF_BEST} best | below {KEEP_OF_BEST} best beyond noise | IQL | CQL | TD3+BC | BC |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    text = "\n".join([head, *rows]) + f"\n\nWall time of every run above: {wall / 3600:.1f} h.\n"
    print(text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("generate", "run", "report"))
    p.add_argument("--envs", nargs="+", default=["hopper"], choices=sorted(ENV_IDS))
    p.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    p.add_argument("--gen-seeds", nargs="+", type=int, default=[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=30000, help="the peers' gradient steps (BDPO's phase B)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per job")
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--bdpo", nargs="*", default=[], help="extra bdpo_offline.py overrides (the change under test)")
    p.add_argument("--out", default="outputs/suite")
    args = p.parse_args(argv)
    return {"generate": generate, "run": run, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
