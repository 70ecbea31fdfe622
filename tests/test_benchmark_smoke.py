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
