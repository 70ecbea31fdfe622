"""The benchmark script runs and writes its JSON (timings themselves are never asserted)."""
import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "bench_bdpo", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_bdpo.py"
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_benchmark_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--only", "acting", "--only", "update", "--no-compile", "--steps", "1", "--batch-size", "32", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["settings"]["N"] == 5 and result["matmul_peak_gflops"] > 0
    assert set(result["acting"]) == {"eager"}
    assert result["acting"]["eager"]["batch_1"]["latency_ms"] > 0
    assert result["acting"]["eager"]["batch_256"]["actions_per_s"] > 0
    assert result["update"]["eager"]["phase_b_steps_per_s"] > 0
    assert result["update"]["gflop_per_phase_b_step"] > 0


def test_profile_script_counts_the_step_ops(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "profile_step", Path(__file__).resolve().parents[1] / "benchmarks" / "profile_step.py"
    )
    profile_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_step)
    out = tmp_path / "profile.json"
    profile_step.main(["--no-compile", "--steps", "1", "--batch-size", "16", "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    for step in ("critic_step", "actor_behavior_step"):
        assert result[step]["kernels_per_step"] > 0 and result[step]["kernel_us_per_step"] > 0
        top = result[step]["top"]
        assert 0 < len(top) <= 25 and top[0]["us_per_step"] >= top[-1]["us_per_step"]
