"""benchmarks/robustness_suite.py: dataset names per generation seed and the report's table."""

import json

from tests.loaders import load_benchmark

suite = load_benchmark("robustness_suite")


def summary(final, best, data=100.0, wall=60.0, one=None, behavior=None):
    last = {"return_mean": final}
    if one is not None:  # runs with the evaluation diagnostics
        last.update(return_one_sample_mean=one, return_behavior_mean=behavior)
    return {"final": last, "best": {"return_mean": best}, "wall_time_s": wall, "dataset": {"mean_episode_return": data}}


def test_report_table(tmp_path, capsys):
    run = tmp_path / "bdpo" / "hopper-weak-medium-gen0"
    for seed, (final, best, one, behavior) in enumerate([(150.0, 160.0, 130.0, 90.0), (120.0, 200.0, None, None)]):
        (run / f"seed{seed}").mkdir(parents=True)
        (run / f"seed{seed}" / "summary.json").write_text(json.dumps(summary(final, best, one=one, behavior=behavior)))
    (run / "seed2").mkdir()  # started, not finished
    peers = tmp_path / "peers" / "hopper-weak-medium-gen0" / "seed0"
    peers.mkdir(parents=True)
    evals = {"evals": [{"step": 10, "mean": 90.0}, {"step": 20, "mean": 110.0}], "wall_s": 30.0}
    (peers / "peers.json").write_text(json.dumps({"runs": {"iql": {"0": evals}, "bc": {"0": evals}}}))
    text = suite.main(["report", "--out", str(tmp_path)])
    row = next(line for line in text.splitlines() if line.startswith("| hopper-weak-medium-gen0"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # data 100; finals 150, 120 (mean 135, std 15); bests 160, 200; seed 1 ended at 60% of its best;
    # only seed 0 logged the diagnostics (one sample 130, behavior 90)
    assert cells == ["hopper-weak-medium-gen0", "100", "135 +- 15", "180 +- 20", "130", "90", "1/2 (1 unfinished)", "110", "—", "—", "110"]
    assert "Wall time of every run above: 0.1 h" in text  # 60 + 60 + 30 + 30 s


def test_dataset_names_per_generation_seed():
    args = suite.argparse.Namespace(envs=["hopper"], gen_seeds=[0, 1], levels=["medium"])
    assert [d[-1] for d in suite.datasets(args)] == ["generated/hopper/medium-v0", "generated-seed1/hopper/medium-v0"]
