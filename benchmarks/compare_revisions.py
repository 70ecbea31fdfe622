"""Time two revisions of the package with ``bench_bdpo.py``, in interleaved rounds: a speed regression check.

    python benchmarks/compare_revisions.py --old <rev> --new HEAD --rounds 3 -- --preset toy --only update

Each revision's files are written once under ``--work-dir`` (``git archive``); every round
runs ``bench_bdpo.py`` of each revision in turn, each in its own process with that revision's
package first on ``PYTHONPATH`` (the process records which ``torchrl_bdpo`` it imported), so both
see the same machine state, round by round. Arguments after ``--`` go to ``bench_bdpo.py``
(``--repeats 1`` unless given). The JSON (``--out``) holds every round's phase-B and pretraining
steps/s of each variant that ``bench_bdpo`` timed, the medians over rounds, new / old of the
medians, and new / old within each round with its median (the figure to read on a drifting VM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("phase_b_steps_per_s", "pretrain_steps_per_s")


def checkout(rev: str, work_dir: Path) -> tuple[str, Path]:
    """The full hash of ``rev`` and a folder holding its files (made once, reused)."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True, text=True)
    if sha.returncode:
        raise SystemExit(f"--old/--new {rev!r}: not a commit of {ROOT} ({sha.stderr.strip()}).")
    sha = sha.stdout.strip()
    tree = work_dir / sha[:12]
    if not (tree / "torchrl_bdpo").is_dir():  # the committed files only (git archive): nothing in .git changes
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return sha, tree


def bench_once(tree: Path, bench_args: list[str], out: Path) -> dict:
    """One ``bench_bdpo.py`` run of the revision in ``tree``; its JSON, with the package it imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    code = (
        "import runpy, sys, torchrl_bdpo; print('PACKAGE', torchrl_bdpo.__file__, flush=True); "
        f"sys.argv = ['bench_bdpo.py', *{bench_args!r}, '--out', {str(out)!r}]; "
        f"runpy.run_path({str(tree / 'benchmarks' / 'bench_bdpo.py')!r}, run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tree)
    if proc.returncode:
        raise SystemExit(f"bench_bdpo.py of {tree} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    package = next(line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("PACKAGE "))
    if not Path(package).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the run of {tree} imported torchrl_bdpo from {package}, not from that revision.")
    return json.loads(out.read_text())


def rates(result: dict) -> dict:
    """``{variant: {metric: steps/s}}`` of a bench_bdpo JSON's update part."""
    update = result.get("update", {})
    return {name: {m: v[m] for m in METRICS if m in v} for name, v in update.items() if isinstance(v, dict) and any(m in v for m in METRICS)}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    bench_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="the baseline revision (e.g. a commit of main)")
    p.add_argument("--new", default="HEAD")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "torchrl_bdpo-revisions")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compare_revisions.json")
    args = p.parse_args(own)
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: expected at least 1")
    if "--repeats" not in bench_args:
        bench_args += ["--repeats", "1"]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    revs = {"old": checkout(args.old, args.work_dir), "new": checkout(args.new, args.work_dir)}
    rounds: dict[str, list[dict]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for label in ("old", "new") if r % 2 == 0 else ("new", "old"):  # alternate which goes first
            measured = rates(bench_once(revs[label][1], bench_args, args.work_dir / f"{label}.json"))
            rounds[label].append(measured)
            print(f"round {r + 1} {label}: {json.dumps(measured)}", flush=True)
    medians = {label: {name: {m: statistics.median(x[name][m] for x in rs) for m in rs[0][name]} for name in rs[0]} for label, rs in rounds.items()}
    ratio = {
        name: {m: medians["new"][name][m] / medians["old"][name][m] for m in medians["old"][name] if m in medians["new"].get(name, {})}
        for name in medians["old"]
    }
    # the ratio within each round (both revisions timed minutes apart), then its median: a VM's
    # speed drifts by tens of percent over a run, which the ratio of medians carries
    per_round = {name: {m: [n[name][m] / o[name][m] for o, n in zip(rounds["old"], rounds["new"])] for m in ratio[name]} for name in ratio}
    result = {
        "date": date.today().isoformat(),
        "command": "python benchmarks/compare_revisions.py " + " ".join(argv),
        "revisions": {label: sha for label, (sha, _) in revs.items()},
        "bench_args": bench_args,
        "rounds": rounds,
        "median": medians,
        "new_over_old": ratio,
        "new_over_old_per_round": per_round,
        "new_over_old_median_of_rounds": {name: {m: statistics.median(v) for m, v in ms.items()} for name, ms in per_round.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"new_over_old_median_of_rounds": result["new_over_old_median_of_rounds"]}, indent=1))
    print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()
