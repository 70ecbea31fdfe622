"""benchmarks/robustness_suite.py: dataset names per generation seed and the report's table."""

import json

from tests.loaders import load_benchmark

suite = load_benchmark("robustness_suite")


def summary(final, best, data=100.0, wall=60.0, one=None, behavior=None, std=None, episodes=10):
    last, top = {"return_mean": final}, {"return_mean": best}
    if one is not None:  # runs with the evaluation diagnostics
        last.update(return_one_sample_mean=one, return_behavior_mean=behavior)
    s = {"final": last, "best": top, "wall_time_s": wall, "dataset": {"mean_episode_return": data}}
    if std is not None:  # the episode std of the final and best evaluations
        last["return_std"], top["return_std"] = std
        s["config"] = {"eval": {"episodes": episodes}}
    return s


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
    # no seed logged the episode std, so whether a fall is beyond the noise is unknown ("—")
    assert cells == ["hopper-weak-medium-gen0", "100", "135 +- 15", "180 +- 20", "130", "90", "1/2 (1 unfinished)", "—", "110", "—", "—", "110"]
    assert "Wall time of every run above: 0.1 h" in text  # 60 + 60 + 30 + 30 s


def test_below_best_beyond_noise():
    # 0.9 * 2000 - 1500 = 300 below; standard error of the difference with std 600 and 540
    # (0.9 * 600) over 10 episodes: hypot(600, 540) / sqrt(10) = 255.3, so the bound is 510.6
    assert suite.below_best_beyond_noise(summary(1500.0, 2000.0, std=(600.0, 600.0))) is False
    # with 100 episodes it is 80.7 x 2 = 161.4 < 300: beyond the noise
    assert suite.below_best_beyond_noise(summary(1500.0, 2000.0, std=(600.0, 600.0), episodes=100)) is True
    # at or above 90% of the best is never flagged
    assert suite.below_best_beyond_noise(summary(1800.0, 2000.0, std=(1.0, 1.0))) is False
    assert suite.below_best_beyond_noise(summary(1500.0, 2000.0)) is None  # no std: not known


def test_report_counts_falls_beyond_noise(tmp_path):
    run = tmp_path / "bdpo" / "walker2d-medium-gen0"
    for seed, (final, std) in enumerate([(1500.0, 600.0), (1000.0, 100.0)]):  # within / beyond the noise
        (run / f"seed{seed}").mkdir(parents=True)
        (run / f"seed{seed}" / "summary.json").write_text(json.dumps(summary(final, 2000.0, std=(std, std))))
    text = suite.main(["report", "--out", str(tmp_path)])
    row = next(line for line in text.splitlines() if line.startswith("| walker2d-medium-gen0"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[6:8] == ["0/2", "1/2"]  # both below 90% of the best; one by more than the noise


def test_dataset_names_per_generation_seed():
    args = suite.argparse.Namespace(envs=["hopper"], gen_seeds=[0, 1], levels=["medium"])
    assert [d[-1] for d in suite.datasets(args)] == ["generated/hopper/medium-v0", "generated-seed1/hopper/medium-v0"]
