"""Offline-to-online BDPO against continued offline training, from the same offline run.

    python benchmarks/offline_to_online.py --offline-run <bdpo_offline.py run> --frames 30000 --seeds 0 1 --jobs 2
    python benchmarks/offline_to_online.py --offline-overrides task=generated-hopper-medium budget=cpu --seeds 0 1

Each seed runs ``sota-implementations/bdpo/bdpo_online.py mode=offline2online`` twice from the same
offline checkpoint, with the same frames, updates per frame, rates, evaluations and seed:

- ``online``: ``replay.offline_fraction=0.5``, each batch half offline data, half the collector's
  (RLPD's 50/50);
- ``offline``: ``replay.offline_fraction=1``, continued offline training: the collector still
  runs (the same evaluation frames, the same acting cost) but its frames are never trained on.

The offline start is a finished ``bdpo_offline.py`` run: ``--offline-run`` (one folder for every
seed, or one per seed), or ``--offline-overrides`` (run here first, once per seed, into
``<out>/offline_seed<s>``). Runs are subprocesses, ``--jobs`` at a time with
``cpu_count // jobs`` torch threads each; a run already finished is read, not run again.

Reported per run: the offline start (the return at frame 0 under the run's acting rule, which
the figure names), the lowest evaluation within the first ``--dip-frames`` frames over the start
(the known offline-to-online dip; the goal is >= 0.9), and the final evaluation over the start
(the goal is > 1). The evaluations are few episodes each; the training episodes (one sample of
the acting policy, every episode the collector finishes) are many more, so each run also reports
their mean and its standard error per ``--bin-frames`` window (the figure's right panel). Out:
``offline_to_online.json`` and ``offline_to_online.png`` in ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from robustness_suite import run_job  # noqa: E402

from torchrl_bdpo.provenance import software_versions  # noqa: E402

SCRIPTS = Path(__file__).resolve().parents[1] / "sota-implementations" / "bdpo"
ARMS = {"online": 0.5, "offline": 1.0}  # replay.offline_fraction of each arm
LABELS = {"online": "offline-to-online (50/50 replay)", "offline": "continued offline training"}


def run_script(script: str, overrides: list[str], out: Path, threads: int) -> dict:
    """``script`` with hydra ``overrides`` into ``out`` (resumed from its checkpoint if it has one); its summary."""
    summary = out / "summary.json"
    if not summary.exists():
        cmd = [sys.executable, str(SCRIPTS / script), *overrides, f"output_dir={out}", f"hydra.run.dir={out}", f"threads={threads}", "checkpoint.resume=true"]
        rc = run_job(cmd, threads, out / "stdout.log")
        if rc != 0 or not summary.exists():
            raise RuntimeError(f"{script} {' '.join(overrides)} failed (exit {rc}): see {out / 'stdout.log'}")
    return json.loads(summary.read_text())


def binned_episodes(episodes: list, frames: int, width: int) -> list[dict]:
    """Training episodes ``[(frame at its end, return), ...]`` in windows of ``width`` frames: the
    count, mean and standard error of the returns that ended in each window."""
    bins = []
    for lo in range(0, frames, width):
        returns = np.asarray([r for f, r in episodes if lo < f <= lo + width], dtype=float)
        sem = float(returns.std(ddof=1) / np.sqrt(len(returns))) if len(returns) > 1 else None
        bins.append({"frames": lo + width, "count": len(returns), "mean": float(returns.mean()) if len(returns) else None, "sem": sem})
    return bins


def run_acting_rule(summary: dict) -> str:
    """The run's evaluation acting rule in words ("best of 10 by Q", "mean of 3 candidates"), from
    the resolved config its ``summary.json`` holds."""
    from omegaconf import OmegaConf

    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    from utils import acting_rule

    return acting_rule(OmegaConf.create(summary["config"]))


def arm_stats(summary: dict, dip_frames: int, bin_frames: int = 5000) -> dict:
    rows = summary["evaluations"]
    if not rows or rows[0]["frames"] != 0:
        raise ValueError("the run has no evaluation at frame 0 (the offline start): set eval.episodes > 0.")
    start = rows[0]["return_mean"]
    early = [r["return_mean"] for r in rows[1:] if r["frames"] <= dip_frames]
    return {
        "acting_rule": run_acting_rule(summary),
        "evals": [
            {"frames": r["frames"], "updates": r["updates"], "mean": r["return_mean"], "std": r["return_std"], "one_sample_mean": r["return_one_sample_mean"]}
            for r in rows
        ],
        "start": start,
        "final": rows[-1]["return_mean"],
        "final_over_start": rows[-1]["return_mean"] / start,
        "min_over_start_first_frames": min(early) / start if early else None,
        "train_episodes": binned_episodes(summary["train_episode_returns"], summary["frames"], bin_frames),
        "wall_s": summary["wall_time_s"],
        "frames_per_s": summary["frames"] / summary["wall_time_s"],
    }


def plot(result: dict, out: Path) -> Path:
    from torchrl_bdpo.plotting import curve, finish, subplots

    fig, (ax, ax_train) = subplots(2, width=11)
    starts = []
    for i, arm in enumerate(ARMS):
        runs = list(result["runs"][arm].values())
        starts += [r["start"] for r in runs]
        x = [e["frames"] for e in runs[0]["evals"]]
        seeds = f" ({len(runs)} seed{'s' * (len(runs) > 1)})"
        curve(ax, x, [[e["mean"] for e in r["evals"]] for r in runs], LABELS[arm] + seeds, f"C{i}")
        bins = [[b["mean"] for b in r["train_episodes"]] for r in runs]
        if all(v is not None for row in bins for v in row):
            curve(ax_train, [b["frames"] for b in runs[0]["train_episodes"]], bins, LABELS[arm] + seeds, f"C{i}")
    start = float(np.mean(starts))
    rules = sorted({r["acting_rule"] for arm in ARMS for r in result["runs"][arm].values()})
    rule = " / ".join(rules)  # one rule unless the arms' --online overrides differ
    ax.axhline(start, color="k", ls="--", lw=1, label=f"offline start ({rule})")
    ax.axhline(0.9 * start, color="k", ls=":", lw=1, label="90% of the start")
    ax.axvline(result["settings"]["dip_frames"], color="gray", lw=0.8)
    one_sample_start = float(np.mean([r["evals"][0]["one_sample_mean"] for arm in ARMS for r in result["runs"][arm].values()]))
    ax_train.axhline(one_sample_start, color="k", ls="--", lw=1, label="offline start (one sample)")
    ylabel = f"return, {rule} ({result['settings']['episodes']} episodes)"
    train_label = f"training episodes, one sample\n(mean return per {result['settings']['bin_frames']} frames)"
    axes = [(ax, "online environment frames", ylabel), (ax_train, "online environment frames", train_label)]
    return finish(fig, axes, out / "offline_to_online.png", title=result["settings"].get("title"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    start_from = p.add_mutually_exclusive_group(required=True)
    start_from.add_argument("--offline-run", nargs="+", help="finished bdpo_offline.py run folder(s): one, or one per seed")
    start_from.add_argument("--offline-overrides", nargs="+", help="bdpo_offline.py overrides, run here once per seed")
    p.add_argument("--frames", type=int, default=30000)
    p.add_argument("--frames-per-batch", type=int, default=1000)
    p.add_argument("--utd-ratio", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=2000)
    p.add_argument("--episodes", type=int, default=5)
    p.add_argument("--dip-frames", type=int, default=10000, help="the window of the dip check (frames)")
    p.add_argument("--bin-frames", type=int, default=5000, help="the window of the training episodes' means (frames)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (cpu_count // jobs torch threads each)")
    p.add_argument("--online", nargs="*", default=[], help="extra bdpo_online.py overrides (both arms)")
    p.add_argument("--out-dir", default="outputs/offline_to_online")
    args = p.parse_args(argv)
    for name in ("frames", "eval_every"):
        if getattr(args, name) % args.frames_per_batch:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a multiple of --frames-per-batch")
    if args.offline_run and len(args.offline_run) not in (1, len(args.seeds)):
        p.error(f"--offline-run: {len(args.offline_run)} folders for {len(args.seeds)} seeds: give one, or one per seed")
    if args.bin_frames < 1:
        p.error(f"--bin-frames {args.bin_frames}: expected an integer >= 1")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: expected an integer >= 1")
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "out_dir"},
        "machine": {**software_versions(), "cpu_count": os.cpu_count(), "threads_per_run": threads},
        "runs": {arm: {} for arm in ARMS},
        "offline_wall_s": {},
    }
    t0 = time.perf_counter()

    def offline_start(i: int, seed: int) -> Path:
        if args.offline_run:
            return Path(args.offline_run[i if len(args.offline_run) > 1 else 0]).resolve()
        folder = out / f"offline_seed{seed}"
        summary = run_script("bdpo_offline.py", [*args.offline_overrides, f"seed={seed}"], folder, threads)
        result["offline_wall_s"][str(seed)] = summary["wall_time_s"]
        return folder

    def arm_run(seed: int, start: Path, arm: str) -> tuple[str, int, dict]:
        overrides = [
            "mode=offline2online",
            f"offline.run={start}",
            f"seed={seed}",
            f"replay.offline_fraction={ARMS[arm]}",
            f"collector.total_frames={args.frames}",
            f"collector.frames_per_batch={args.frames_per_batch}",
            f"optim.utd_ratio={args.utd_ratio}",
            f"eval.interval={args.eval_every}",
            f"eval.episodes={args.episodes}",
            f"checkpoint.interval={args.eval_every}",
            f"logger.log_interval={args.frames_per_batch}",
            *args.online,
        ]
        return arm, seed, arm_stats(run_script("bdpo_online.py", overrides, out / f"{arm}_seed{seed}", threads), args.dip_frames, args.bin_frames)

    with ThreadPoolExecutor(args.jobs) as pool:
        starts = dict(zip(args.seeds, pool.map(offline_start, range(len(args.seeds)), args.seeds)))
        jobs = [pool.submit(arm_run, seed, starts[seed], arm) for seed in args.seeds for arm in ARMS]
        for job in jobs:
            arm, seed, stats = job.result()
            result["runs"][arm][str(seed)] = stats
            (out / "offline_to_online.json").write_text(json.dumps(result, indent=1))
    result["settings"]["title"] = "offline start: " + ", ".join(f"{p.parent.name}/{p.name}" for p in dict.fromkeys(starts.values()))
    result["wall_s"] = time.perf_counter() - t0
    result["plot"] = str(plot(result, out))
    (out / "offline_to_online.json").write_text(json.dumps(result, indent=1))
    for arm in ARMS:
        runs = result["runs"][arm].values()
        dips = [r["min_over_start_first_frames"] for r in runs]
        print(
            f"{arm}: final / start {[round(r['final_over_start'], 3) for r in runs]}, lowest in the first "
            f"{args.dip_frames} frames / start {[None if d is None else round(d, 3) for d in dips]}, "
            f"{np.mean([r['frames_per_s'] for r in runs]):.1f} env frames/s"
        )
    return result


if __name__ == "__main__":
    main()
