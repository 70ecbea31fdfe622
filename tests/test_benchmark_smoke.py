"""The benchmark script runs and writes its JSON (timings themselves are never asserted)."""
import importlib.util
import json
from pathlib import Path

import pytest


def load_benchmark(name: str):
    """The module ``benchmarks/<name>.py``, loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_benchmark("bench_bdpo")


def test_benchmark_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--only", "acting", "--only", "update", "--no-compile", "--steps", "1", "--repeats", "2",
                "--batch-size", "32", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["settings"]["repeats"] == 2
    assert result["settings"]["N"] == 5 and result["matmul_peak_gflops"] > 0
    assert result["settings"]["terminal_next_states"] is False  # D4RL preset: live next states
    assert set(result["acting"]) == {"eager"}
    assert result["acting"]["eager"]["batch_1"]["latency_ms"] > 0
    assert result["acting"]["eager"]["batch_256"]["actions_per_s"] > 0
    assert result["update"]["eager"]["phase_b_steps_per_s"] > 0
    assert result["update"]["gflop_per_phase_b_step"] > 0
    # medians over the rounds, every round kept
    rounds = result["update"]["eager"]["rounds"]
    assert len(rounds) == 2 and len(result["acting"]["eager"]["rounds"]) == 2
    rates = sorted(r["phase_b_steps_per_s"] for r in rounds)
    assert result["update"]["eager"]["phase_b_steps_per_s"] == pytest.approx(sum(rates) / 2)
    assert len(result["update"]["bare_mlp_rounds"]["eager"]) == 2 and result["update"]["bare_mlp_steps_per_s"]["eager"] > 0
    assert 0 < result["update"]["eager"]["fraction_of_matmul_peak"] == result["update"]["best_fraction_of_matmul_peak"]


def test_toy_preset_times_terminal_batches(tmp_path):
    """The toy bandits' transitions all end: the toy preset's batches are terminal, so the
    critic step samples no Q-target path and counts fewer FLOPs than live batches."""
    flops = {}
    for terminal in ("preset", "none"):
        out = tmp_path / f"{terminal}.json"
        bench.main(["--preset", "toy", "--only", "update", "--no-compile", "--steps", "1", "--repeats", "1",
                    "--batch-size", "8", "--terminal", terminal, "--out", str(out)])
        result = json.loads(out.read_text())
        assert result["settings"]["N"] == 50
        assert result["settings"]["terminal_next_states"] is (terminal == "preset")
        flops[terminal] = result["update"]["gflop_per_phase_b_step"]
    assert 0 < flops["preset"] < flops["none"] / 2


def test_gpu_update_variants_add_the_two_stream_steps():
    """On a GPU each graphed update is timed again with overlap_losses (unless --no-overlap); a CPU has none."""
    import torch

    args = bench.build_parser().parse_args([])
    names = bench.update_variants(args, torch.device("cuda"))
    u = "uniform"
    assert names == {
        "eager": (False, False, False, u), "cudagraphs": (False, True, False, u), "compiled": (True, False, False, u),
        "compiled_cudagraphs": (True, True, False, u), "cudagraphs_overlap": (False, True, True, u),
        "compiled_cudagraphs_overlap": (True, True, True, u),
    }
    no_overlap = bench.update_variants(bench.build_parser().parse_args(["--no-overlap"]), torch.device("cuda"))
    assert not any(v[2] for v in no_overlap.values())
    assert set(bench.update_variants(args, torch.device("cpu"))) == {"eager", "compiled"}


def test_step_sampling_variants():
    """--step-sampling both: the fastest kind of step again with stratified steps; stratified: all of them."""
    import torch

    both = bench.build_parser().parse_args(["--step-sampling", "both"])
    gpu = bench.update_variants(both, torch.device("cuda"))
    assert gpu["compiled_cudagraphs_overlap_stratified"] == (True, True, True, "stratified")
    assert [n for n, v in gpu.items() if v[3] == "stratified"] == ["compiled_cudagraphs_overlap_stratified"]
    cpu = bench.update_variants(both, torch.device("cpu"))
    assert cpu == {"eager": (False, False, False, "uniform"), "compiled": (True, False, False, "uniform"),
                   "compiled_stratified": (True, False, False, "stratified")}
    only = bench.update_variants(bench.build_parser().parse_args(["--step-sampling", "stratified"]), torch.device("cpu"))
    assert only == {"eager": (False, False, False, "stratified"), "compiled": (True, False, False, "stratified")}


def bench_update_of(variants, tmp_path, monkeypatch, repeats=1):
    """``bench_bdpo.py --only update`` at batch 8 over the given ``update_variants``: the JSON's update part."""
    monkeypatch.setattr(bench, "update_variants", lambda args, device: variants)
    out = tmp_path / "bench.json"
    bench.main(["--only", "update", "--steps", "1", "--repeats", str(repeats), "--batch-size", "8", "--out", str(out)])
    return json.loads(out.read_text())["update"]


def test_stratified_variant_is_timed_against_its_uniform_twin(tmp_path, monkeypatch):
    result = bench_update_of({"eager": (False, False, False, "uniform"), "eager_stratified": (False, False, False, "stratified")},
                             tmp_path, monkeypatch, repeats=2)
    assert result["eager_stratified"]["speedup_over_uniform_steps"] > 0
    assert "speedup_over_uniform_steps" not in result["eager"]


def test_a_variant_that_fails_to_build_is_reported_and_the_others_run(tmp_path, monkeypatch):
    """A variant that raises while built (here two streams on a CPU) gets its error in the JSON."""
    result = bench_update_of({"eager": (False, False, False, "uniform"), "eager_overlap": (False, False, True, "uniform")},
                             tmp_path, monkeypatch)
    assert result["eager"]["phase_b_steps_per_s"] > 0
    assert set(result["eager_overlap"]) == {"error"}  # not timed
    assert result["eager_overlap"]["error"].startswith("ValueError: overlap_losses=True runs the losses on two CUDA streams")


def test_benchmark_rejects_zero_repeats(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])
    assert "--repeats=0: expected an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("sampling", ["uniform", "stratified"])
def test_profile_script_counts_the_step_ops(tmp_path, sampling):
    profile_step = load_benchmark("profile_step")
    out = tmp_path / "profile.json"
    profile_step.main(["--no-compile", "--steps", "1", "--batch-size", "16", "--device", "cpu", "--out", str(out),
                       "--step-sampling", sampling])
    result = json.loads(out.read_text())
    assert result["step_sampling"] == sampling
    for step in ("critic_step", "actor_behavior_step"):
        assert result[step]["kernels_per_step"] > 0 and result[step]["kernel_us_per_step"] > 0
        top = result[step]["top"]
        assert 0 < len(top) <= 25 and top[0]["us_per_step"] >= top[-1]["us_per_step"]
        per_stream = result[step]["kernel_us_per_stream"]  # on a CPU: per thread
        assert sum(per_stream.values()) == pytest.approx(result[step]["kernel_us_per_step"])


def test_pretrain_overhead_times_the_parts_and_the_bare_mlp(tmp_path):
    module = load_benchmark("pretrain_overhead")
    out = tmp_path / "overhead.json"
    module.main(["--no-compile", "--preset", "toy", "--batch-size", "16", "--steps", "3", "--repeats", "2", "--out", str(out)])
    res = json.loads(out.read_text())["batch_16"]
    assert len(res["rounds_us"]) == 2
    for r in res["rounds_us"]:  # the parts add up to the timed sum of the written-out step
        assert all(r[k] > 0 for k in module.PARTS)
        assert sum(r[k] for k in module.PARTS) == pytest.approx(r["parts_sum"], rel=0.2)
    assert res["behavior_step_us"] > 0 and res["bare_mlp_step_us"] > 0 and res["behavior_over_bare"] > 0


def test_compile_ab_parses_variants():
    ab = load_benchmark("gpu_compile_ab")
    assert ab.parse_variant("default") == ("default", None, {})
    assert ab.parse_variant("auto:max-autotune-no-cudagraphs") == ("auto", "max-autotune-no-cudagraphs", {})
    assert ab.parse_variant("combo:default:combo_kernels=True,max_fusion_size=32") == (
        "combo", None, {"combo_kernels": True, "max_fusion_size": 32}
    )
    with pytest.raises(SystemExit, match="expected key=value pairs"):
        ab.parse_variant("x:default:combo_kernels")
    with pytest.raises(SystemExit, match="has no 'no_such_setting'"):
        ab.parse_variant("x:default:no_such_setting=1")
    assert all(ab.parse_variant(v)[0] for v in ab.DEFAULT_VARIANTS)  # the default list parses here too


@pytest.mark.slow
def test_compile_ab_runs_on_cpu(tmp_path):
    """Two variants compiled one after the other (dynamo reset between them) give the same losses."""
    ab = load_benchmark("gpu_compile_ab")
    out = tmp_path / "ab.json"
    ab.main(["--device", "cpu", "--steps", "1", "--rounds", "2", "--variant", "a:default",
             "--variant", "b:default:combo_kernels=True", "--step-sampling", "stratified", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["rounds"]] == ["a", "b", "a", "b"]
    assert all(r["phase_b_steps_per_s"] > 0 and r["pretrain_steps_per_s"] > 0 for r in result["rounds"])
    assert result["settings"]["overlap_losses"] is False  # a CPU has no streams
    assert result["settings"]["step_sampling"] == "stratified"
    built = result["built"]
    assert built["b"]["config"] == {"combo_kernels": True}
    assert built["a"]["loss_qvalue_third_step"] == pytest.approx(built["b"]["loss_qvalue_third_step"], rel=1e-4)


def test_a_run_cut_short_keeps_the_rounds_it_timed(tmp_path, monkeypatch):
    """The update part's JSON is written after each build and round: a run stopped in round 2
    (here by an error, on a device by its time limit) keeps round 1, marked partial."""
    timed = bench.time_steps
    calls = []

    def time_steps(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("stopped in round 2")
        return timed(*args, **kwargs)

    monkeypatch.setattr(bench, "time_steps", time_steps)
    monkeypatch.setattr(bench, "update_variants", lambda args, device: {"eager": (False, False, False, "uniform")})
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--only", "update", "--steps", "1", "--repeats", "3", "--batch-size", "8", "--out", str(out)])
    update = json.loads(out.read_text())["update"]
    assert update["partial"] is True and update["gflop_per_phase_b_step"] > 0
    assert update["setup_s"]["eager"] > 0
    assert len(update["rounds"]["eager"]) == 1 and update["rounds"]["eager"][0]["phase_b_steps_per_s"] > 0
    assert "eager" not in update  # no median of an unfinished run
