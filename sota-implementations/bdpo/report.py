"""The results table of one or more sweeps, with honest statistics (rliable).

    python sota-implementations/bdpo/report.py multirun/toy_all
    python sota-implementations/bdpo/report.py multirun/d4rl_locomotion --out reports/d4rl --reps 5000

Every job folder of the sweeps (one that holds the ``config.yaml`` a script writes) is a run.
A finished run has ``summary.json``; the others are flagged (``unfinished``: a checkpoint, no
summary; ``failed``: neither), never dropped silently. Runs are grouped per task (the dataset),
and a task's runs must share their config except the seed (else a ``ValueError`` names them).

Per run, the score is: offline, the final normalised score (D4RL's 100 (R - R_random) /
(R_expert - R_random); the raw return when the dataset has no reference scores); toy bandits,
the share of the gap from the behavior to pi* that the actor closes in E r, in percent
(100 (r_actor - r_behavior) / (r_pi* - r_behavior)); online, the final return.

Out (``--out``, default ``<first sweep>/report``): ``table.md`` and ``table.csv`` (per task:
mean +- std over seeds, the number of seeds, flagged runs; toys also the sliced W2 to pi*),
``aggregate.json`` (IQM, mean and median over tasks and seeds with 95% stratified bootstrap
confidence intervals, by rliable), ``performance_profile.png`` and ``curves.png`` (per task,
the evaluation curve's mean and its 95% bootstrap band over seeds).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import _diff_keys  # noqa: E402

# keys that may differ between the runs of one cell (besides the seed)
RUN_KEYS = ("seed", "output_dir", "checkpoint", "logger", "threads", "device", "compile", "eval")


def find_runs(sweeps: list[Path]) -> list[Path]:
    """Job folders: those holding hydra's ``.hydra`` record or a script's ``config.yaml``, not
    inside another job folder (a job that failed before writing anything has the record only)."""
    runs = []
    for sweep in sweeps:
        if not sweep.is_dir():
            raise FileNotFoundError(f"{sweep}: no such sweep folder (a multirun directory, e.g. multirun/toy_all).")
        found = {p.parent for p in sweep.rglob("config.yaml") if p.parent.parent.name != ".hydra"}
        found |= {p.parent for p in sweep.rglob(".hydra") if p.is_dir()}
        for folder in sorted(found, key=lambda f: (len(f.parts), str(f))):
            if not any(parent in runs for parent in folder.parents):
                runs.append(folder)
    if not runs:
        raise ValueError(
            f"no runs in {[str(s) for s in sweeps]}: expected job folders holding the config.yaml that "
            f"bdpo_toy2d.py, bdpo_offline.py and bdpo_online.py write. Is this the sweep's folder?"
        )
    return runs


def _config_path(folder: Path) -> Path:
    """The script's config.yaml, or hydra's record of the job's config when the job failed first."""
    if (folder / "config.yaml").exists():
        return folder / "config.yaml"
    records = sorted((folder / ".hydra").glob("*/config.yaml")) + sorted((folder / ".hydra").glob("config.yaml"))
    if not records:
        raise ValueError(f"{folder}: a job folder with neither config.yaml nor a hydra record of its config.")
    return records[-1]


def kind_of(cfg) -> str:
    if "mode" in cfg and "collector" in cfg:
        return "online"
    return "toy" if "num_points" in cfg.env else "offline"


def task_of(cfg, kind: str) -> str:
    if kind == "online":  # offline2online runs take the env of their offline run's dataset
        return str(cfg.env.name or f"offline2online from {cfg.offline.run or cfg.offline.overrides}")
    return str(cfg.env.dataset)


def read_run(folder: Path) -> dict:
    cfg = OmegaConf.load(_config_path(folder))
    kind = kind_of(cfg)
    run = {
        "folder": str(folder),
        "kind": kind,
        "task": task_of(cfg, kind),
        "seed": int(cfg.seed),
        "config": OmegaConf.to_container(cfg, resolve=False),
        "status": "finished",
        "score": None,
    }
    path = folder / "summary.json"
    if not path.exists():
        run["status"] = "unfinished" if (folder / "checkpoint.pt").exists() else "failed"
        return run
    s = json.loads(path.read_text())
    if kind == "toy":
        m = s["metrics"]
        gap = m["reward_pstar"] - m["reward_behavior"]
        run["score"] = 100.0 * (m["reward_actor"] - m["reward_behavior"]) / gap if abs(gap) > 1e-12 else float("nan")
        run.update(sw_actor=m["sw_actor_pstar"], sw_behavior=m["sw_behavior_pstar"], reward_actor=m["reward_actor"], reward_pstar=m["reward_pstar"])
        return run
    final = s.get("final")
    if final is None:
        run["status"] = "no evaluation"
        return run
    key = "score_mean" if "score_mean" in final else "return_mean"
    run["score"], run["score_kind"] = float(final[key]), key
    x = "frames" if kind == "online" else "global_step"
    rows = [r for r in s.get("evaluations", []) if kind == "online" or r.get("phase") == "train"]
    run["curve"] = [(r[x], r.get(key, r["return_mean"])) for r in rows]
    return run


def group(runs: list[dict]) -> dict[str, list[dict]]:
    cells: dict[str, list[dict]] = {}
    for run in runs:
        cells.setdefault(run["task"], []).append(run)
    for task, members in cells.items():
        base = {k: v for k, v in members[0]["config"].items() if k not in RUN_KEYS}
        for other in members[1:]:
            mine = {k: v for k, v in other["config"].items() if k not in RUN_KEYS}
            if mine != base:
                raise ValueError(
                    f"task {task!r} mixes runs of different configs: {members[0]['folder']} and {other['folder']} "
                    f"differ in {_diff_keys(mine, base)}. Report them as separate sweeps (one folder each)."
                )
        seeds = [r["seed"] for r in members]
        if len(set(seeds)) != len(seeds):
            raise ValueError(
                f"task {task!r} holds seed {max(set(seeds), key=seeds.count)} more than once: {[r['folder'] for r in members]}. Remove the duplicate run."
            )
    return cells


def _pm(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{np.mean(values):.1f} +- {np.std(values):.1f}"


def table(cells: dict[str, list[dict]]) -> tuple[str, list[dict]]:
    toy = all(r["kind"] == "toy" for rs in cells.values() for r in rs)
    score_name = "gap to pi* closed (%)" if toy else "score"
    head = ["task", score_name, "seeds", "flagged runs"] + (["sliced W2 to pi*: actor", "behavior", "E r actor / pi*"] if toy else [])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    rows = []
    for task in sorted(cells):
        members = sorted(cells[task], key=lambda r: r["seed"])
        done = [r for r in members if r["score"] is not None]
        flagged = [f"seed {r['seed']} {r['status']}" for r in members if r["score"] is None]
        scores = [r["score"] for r in done]
        row = {
            "task": task,
            "mean": float(np.mean(scores)) if scores else None,
            "std": float(np.std(scores)) if scores else None,
            "seeds": len(done),
            "flagged": "; ".join(flagged),
        }
        cellv = [task, _pm(scores), str(len(done)), row["flagged"] or "—"]
        if toy:
            sw_a, sw_b = [r["sw_actor"] for r in done], [r["sw_behavior"] for r in done]
            ra, rp = [r["reward_actor"] for r in done], [r["reward_pstar"] for r in done]
            cellv += [
                f"{np.mean(sw_a):.3f}" if done else "—",
                f"{np.mean(sw_b):.3f}" if done else "—",
                f"{np.mean(ra):.3f} / {np.mean(rp):.3f}" if done else "—",
            ]
            row.update(sw_actor=float(np.mean(sw_a)) if done else None, sw_behavior=float(np.mean(sw_b)) if done else None)
        lines.append("| " + " | ".join(cellv) + " |")
        rows.append(row)
    return "\n".join(lines), rows


def aggregate(cells: dict[str, list[dict]], reps: int, seed: int = 0) -> dict:
    """IQM, mean and median over tasks x seeds with 95% stratified bootstrap CIs (rliable)."""
    try:
        from rliable import library as rly
        from rliable import metrics
    except ImportError as err:
        raise ImportError(f'{err}: the aggregate statistics need rliable: pip install "torchrl_bdpo[sweep]"') from err
    per_task = {t: [r["score"] for r in sorted(rs, key=lambda r: r["seed"]) if r["score"] is not None] for t, rs in cells.items()}
    per_task = {t: s for t, s in per_task.items() if s}
    if not per_task:
        return {"note": "no finished run"}
    n = min(len(s) for s in per_task.values())  # rliable takes a runs x tasks array
    scores = np.array([per_task[t][:n] for t in sorted(per_task)]).T
    np.random.seed(seed)

    def agg(x):
        return np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x), metrics.aggregate_median(x)])

    point, ci = rly.get_interval_estimates({"BDPO": scores}, agg, reps=reps)
    out = {"tasks": sorted(per_task), "seeds_per_task_used": n, "reps": reps}
    for i, name in enumerate(("iqm", "mean", "median")):
        out[name] = {"point": float(point["BDPO"][i]), "ci95": [float(ci["BDPO"][0, i]), float(ci["BDPO"][1, i])]}
    out["scores"] = scores.tolist()
    return out


def figures(cells: dict[str, list[dict]], aggregate_out: dict, out: Path, reps: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if "scores" in aggregate_out:
        from rliable import library as rly
        from rliable import plot_utils

        scores = np.array(aggregate_out["scores"])
        thresholds = np.linspace(min(0.0, scores.min()), scores.max() * 1.05 + 1e-9, 81)
        profiles, cis = rly.create_performance_profile({"BDPO": scores}, thresholds, reps=reps)
        fig, ax = plt.subplots(figsize=(6, 4))
        plot_utils.plot_performance_profiles(profiles, thresholds, performance_profile_cis=cis, colors={"BDPO": "C1"}, xlabel="score threshold", ax=ax)
        fig.tight_layout()
        paths.append(out / "performance_profile.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    curved = {t: [r for r in rs if r.get("curve")] for t, rs in cells.items()}
    curved = {t: rs for t, rs in curved.items() if rs}
    if curved:
        cols = min(3, len(curved))
        rows_ = (len(curved) + cols - 1) // cols
        fig, axes = plt.subplots(rows_, cols, figsize=(4.5 * cols, 3.2 * rows_), squeeze=False)
        rng = np.random.default_rng(0)
        for ax, task in zip(axes.flat, sorted(curved)):
            runs = curved[task]
            n = min(len(r["curve"]) for r in runs)
            x = [p[0] for p in runs[0]["curve"][:n]]
            y = np.array([[p[1] for p in r["curve"][:n]] for r in runs])
            boot = y[rng.integers(0, len(y), (1000, len(y)))].mean(1)  # a plain bootstrap over seeds, per point
            ax.plot(x, y.mean(0), color="C1", label=f"{len(y)} seed{'s' * (len(y) > 1)}")
            ax.fill_between(x, np.percentile(boot, 2.5, 0), np.percentile(boot, 97.5, 0), color="C1", alpha=0.25)
            ax.set_title(task, fontsize=8)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(curved) :]:
            ax.axis("off")
        fig.tight_layout()
        paths.append(out / "curves.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweeps", nargs="+", type=Path, help="multirun folders")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--reps", type=int, default=2000, help="bootstrap resamples")
    args = p.parse_args(argv)
    runs = [read_run(f) for f in find_runs(args.sweeps)]
    cells = group(runs)
    out = args.out or args.sweeps[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    text, rows = table(cells)
    agg = aggregate(cells, args.reps)
    paths = figures(cells, agg, out, args.reps)
    (out / "table.md").write_text(text + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    (out / "aggregate.json").write_text(json.dumps(agg, indent=1))
    print(text)
    if "iqm" in agg:
        print(
            ", ".join(f"{k} {agg[k]['point']:.1f} [{agg[k]['ci95'][0]:.1f}, {agg[k]['ci95'][1]:.1f}]" for k in ("iqm", "mean", "median"))
            + f" (95% stratified bootstrap CIs, {agg['seeds_per_task_used']} seeds per task)"
        )
    return {"rows": rows, "aggregate": agg, "figures": [str(x) for x in paths], "runs": runs}


if __name__ == "__main__":
    main()
