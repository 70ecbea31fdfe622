"""The benchmark script runs and writes its JSON (timings themselves are never asserted)."""

import json

import pytest

from tests.loaders import ROOT, load_benchmark


bench = load_benchmark("bench_bdpo")


def test_benchmark_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--only", "acting", "--only", "update", "--no-compile", "--steps", "1", "--repeats", "2", "--batch-size", "32", "--out", str(out)])
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


def test_benchmark_builds_the_update_as_the_scripts_do():
    """Compiled CPU steps get the ensemble chunks' compile options (the steps' mode), eager and
    graphed ones none, as utils.chunk_compile_options gives the scripts' losses."""
    for kwargs, expected in [
        ({}, None),
        ({"compile": True}, {}),
        ({"compile": True, "compile_mode": "max-autotune-no-cudagraphs"}, {"mode": "max-autotune-no-cudagraphs"}),
    ]:
        assert bench.make_update("cpu", N=2, **kwargs).loss.speed.ensemble_chunk_compile == expected, kwargs


def test_toy_preset_times_terminal_batches(tmp_path):
    """The toy bandits' transitions all end: the toy preset's batches are terminal, so the
    critic step samples no Q-target path and counts fewer FLOPs than live batches."""
    flops = {}
    for terminal in ("preset", "none"):
        out = tmp_path / f"{terminal}.json"
        args = "--preset toy --only update --no-compile --steps 1 --repeats 1 --batch-size 8".split()
        bench.main(args + ["--terminal", terminal, "--out", str(out)])
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
        "eager": (False, False, False, u, None),
        "cudagraphs": (False, True, False, u, None),
        "compiled": (True, False, False, u, None),
        "compiled_cudagraphs": (True, True, False, u, None),
        "cudagraphs_overlap": (False, True, True, u, None),
        "compiled_cudagraphs_overlap": (True, True, True, u, None),
        "compiled_cudagraphs_overlap_sums": (True, True, True, u, "cuda"),  # the narrow maps as sums
    }
    no_overlap = bench.update_variants(bench.build_parser().parse_args(["--no-overlap"]), torch.device("cuda"))
    assert not any(v[2] for v in no_overlap.values())
    assert no_overlap["compiled_cudagraphs_sums"] == (True, True, False, u, "cuda")
    no_ab = bench.update_variants(bench.build_parser().parse_args(["--no-narrow-ab"]), torch.device("cuda"))
    assert set(no_ab) == set(names) - {"compiled_cudagraphs_overlap_sums"}
    assert set(bench.update_variants(args, torch.device("cpu"))) == {"eager", "compiled"}


def test_step_sampling_variants():
    """--step-sampling both: the fastest kind of step again with stratified steps; stratified: all of them."""
    import torch

    both = bench.build_parser().parse_args(["--step-sampling", "both"])
    gpu = bench.update_variants(both, torch.device("cuda"))
    assert gpu["compiled_cudagraphs_overlap_stratified"] == (True, True, True, "stratified", None)
    assert [n for n, v in gpu.items() if v[3] == "stratified"] == ["compiled_cudagraphs_overlap_stratified"]
    cpu = bench.update_variants(both, torch.device("cpu"))
    assert cpu == {
        "eager": (False, False, False, "uniform", None),
        "compiled": (True, False, False, "uniform", None),
        "compiled_stratified": (True, False, False, "stratified", None),
    }
    only = bench.update_variants(bench.build_parser().parse_args(["--step-sampling", "stratified"]), torch.device("cpu"))
    assert only == {"eager": (False, False, False, "stratified", None), "compiled": (True, False, False, "stratified", None)}


def bench_update_of(variants, tmp_path, monkeypatch, repeats=1):
    """``bench_bdpo.py --only update`` at batch 8 over the given ``update_variants``: the JSON's update part."""
    monkeypatch.setattr(bench, "update_variants", lambda args, device: variants)
    out = tmp_path / "bench.json"
    bench.main(["--only", "update", "--steps", "1", "--repeats", str(repeats), "--batch-size", "8", "--out", str(out)])
    return json.loads(out.read_text())["update"]


def test_stratified_variant_is_timed_against_its_uniform_twin(tmp_path, monkeypatch):
    result = bench_update_of(
        {"eager": (False, False, False, "uniform", None), "eager_stratified": (False, False, False, "stratified", None)}, tmp_path, monkeypatch, repeats=2
    )
    assert result["eager_stratified"]["speedup_over_uniform_steps"] > 0
    assert "speedup_over_uniform_steps" not in result["eager"]


def test_sums_variant_builds_with_the_narrow_maps_as_sums_and_is_timed_against_its_twin(tmp_path, monkeypatch):
    """``<name>_sums`` builds its networks with ``fuse_narrow="cuda"`` (the others with the default,
    ``False``), a failed build is reported, and its speed over the default's is reported per round."""
    from torchrl_bdpo.speed import kernels

    seen = {}
    make_update = bench.make_update

    def recording_make_update(*args, **kwargs):
        update = make_update(*args, **kwargs)
        seen[len(seen)] = {m.fuse_narrow for m in kernels._fusing_modules(update.loss)}
        if len(seen) == 3:
            raise RuntimeError("a build that fails")
        return update

    monkeypatch.setattr(bench, "make_update", recording_make_update)
    result = bench_update_of(
        {
            "eager": (False, False, False, "uniform", None),
            "eager_sums": (False, False, False, "uniform", "cuda"),
            "broken_sums": (False, False, False, "uniform", "cuda"),
        },
        tmp_path,
        monkeypatch,
        repeats=2,
    )
    assert seen == {0: {False}, 1: {"cuda"}, 2: {"cuda"}}
    assert result["eager_sums"]["speedup_over_gemms"] > 0
    assert "speedup_over_gemms" not in result["eager"]
    assert set(result["broken_sums"]) == {"error"}


def test_a_variant_that_fails_to_build_is_reported_and_the_others_run(tmp_path, monkeypatch):
    """A variant that raises while built (here two streams on a CPU) gets its error in the JSON."""
    result = bench_update_of({"eager": (False, False, False, "uniform", None), "eager_overlap": (False, False, True, "uniform", None)}, tmp_path, monkeypatch)
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
    fuse = [] if sampling == "uniform" else ["--fuse-narrow", "cuda"]  # "cuda" writes GEMMs on a CPU
    profile_step.main(["--no-compile", "--steps", "1", "--batch-size", "16", "--device", "cpu", "--out", str(out), "--step-sampling", sampling, *fuse])
    result = json.loads(out.read_text())
    assert result["step_sampling"] == sampling
    assert result["fuse_narrow_linear"] == (False if sampling == "uniform" else "cuda")
    for step in ("critic_step", "actor_behavior_step"):
        assert result[step]["kernels_per_step"] > 0 and result[step]["kernel_us_per_step"] > 0
        top = result[step]["top"]
        assert 0 < len(top) <= 25 and top[0]["us_per_step"] >= top[-1]["us_per_step"]
        per_stream = result[step]["kernel_us_per_stream"]  # on a CPU: per thread
        assert sum(per_stream.values()) == pytest.approx(result[step]["kernel_us_per_step"])
        r = result[step]  # the timeline: busy within the span, and at most the summed op time
        assert 0 < r["busy_us_per_step"] <= r["span_us_per_step"] + 1e-6
        assert r["busy_us_per_step"] <= r["kernel_us_per_step"] + 1e-6
        assert r["idle_us_per_step"] == pytest.approx(r["span_us_per_step"] - r["busy_us_per_step"])
        assert r["overlap_us_per_step"] == pytest.approx(r["kernel_us_per_step"] - r["busy_us_per_step"])
        assert r["wall_us_per_step"] > 0 and r["host_us_per_call"] > 0
        assert r["gemm_calls_per_step"] > 0  # counted: no CUDA graphs
    assert result["cudagraphs"] is False


def test_profile_timeline_merges_overlapping_intervals():
    profile_step = load_benchmark("profile_step")
    # two streams: [0, 4) and [2, 5) overlap, [3, 3.5) nested, a gap to [7, 8)
    assert profile_step.timeline([(7.0, 8.0), (0.0, 4.0), (3.0, 3.5), (2.0, 5.0)]) == (6.0, 8.0)
    assert profile_step.timeline([(1.0, 2.0), (2.0, 3.0)]) == (2.0, 2.0)  # touching: no idle time
    assert profile_step.timeline([]) == (0.0, 0.0)


def test_profile_script_refuses_cudagraphs_without_cuda(capsys):
    profile_step = load_benchmark("profile_step")
    with pytest.raises(SystemExit):
        profile_step.main(["--cudagraphs", "--device", "cpu", "--steps", "1"])
    err = capsys.readouterr().err
    assert "--cudagraphs profiles CUDA-graph replays, but --device is 'cpu'" in err and "--device cuda" in err
    with pytest.raises(SystemExit):
        profile_step.main(["--steps", "0", "--device", "cpu"])
    assert "--steps=0: expected an integer >= 1" in capsys.readouterr().err


def test_profile_script_like_gpu_counts_gemms(tmp_path):
    profile_step = load_benchmark("profile_step")
    out = tmp_path / "profile.json"
    result = profile_step.main(
        ["--no-compile", "--steps", "1", "--batch-size", "16", "--device", "cpu", "--out", str(out), "--like-gpu", "--fuse-narrow", "true"]
    )
    assert json.loads(out.read_text()) == result
    assert result["like_gpu"] is True and result["fuse_narrow_linear"] is True
    for step in ("critic_step", "actor_behavior_step"):
        assert result[step]["gemm_calls_per_step"] > 10
    assert profile_step.bench.make_loss.__qualname__ == "make_loss"  # swapped only while it built


@pytest.mark.slow
def test_profile_script_counts_fewer_gemms_with_the_narrow_maps_as_sums(tmp_path):
    """Compiled as on a GPU (on the CPU): the narrow maps as sums take GEMM calls out of both steps."""
    profile_step = load_benchmark("profile_step")
    gemms = {}
    for fuse in ("false", "true"):
        result = profile_step.main(
            ["--steps", "1", "--batch-size", "16", "--device", "cpu", "--like-gpu", "--fuse-narrow", fuse, "--out", str(tmp_path / f"{fuse}.json")]
        )
        gemms[fuse] = {k: result[k]["gemm_calls_per_step"] for k in ("critic_step", "actor_behavior_step")}
    for step in ("critic_step", "actor_behavior_step"):
        assert gemms["true"][step] < 0.85 * gemms["false"][step], gemms


def test_gpu_check_fits_the_issue_s_eight_minutes():
    """The check mode's time limits (tests, script tests, benchmark) add up to 8 minutes at most."""
    import re

    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    check = text[text.index("# the gpu-marked tests") :]
    limits = [int(m) for line in check.splitlines() if not line.lstrip().startswith("#") for m in re.findall(r"\btimeout (\d+)", line)]
    assert len(limits) == 3 and sum(limits) <= 480, limits


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
    assert ab.parse_variant("combo:default:combo_kernels=True,max_fusion_size=32") == ("combo", None, {"combo_kernels": True, "max_fusion_size": 32})
    with pytest.raises(SystemExit, match="expected key=value pairs"):
        ab.parse_variant("x:default:combo_kernels")
    with pytest.raises(SystemExit, match="has no 'no_such_setting'"):
        ab.parse_variant("x:default:no_such_setting=1")
    assert ab.parse_variant("sums:default:fuse_narrow=cuda,combo_kernels=True") == ("sums", None, {"fuse_narrow": "cuda", "combo_kernels": True})
    import torch._inductor.config as inductor_config

    combo = inductor_config.combo_kernels
    with ab.patched({"fuse_narrow": False, "combo_kernels": not combo}):  # the library's setting is not inductor's
        assert inductor_config.combo_kernels is not combo
    assert inductor_config.combo_kernels is combo
    assert all(ab.parse_variant(v)[0] for v in ab.DEFAULT_VARIANTS)  # the default list parses here too


@pytest.mark.slow
def test_compile_ab_runs_on_cpu(tmp_path):
    """Two variants compiled one after the other (dynamo reset between them) give the same losses."""
    ab = load_benchmark("gpu_compile_ab")
    out = tmp_path / "ab.json"
    ab.main(
        [
            "--device",
            "cpu",
            "--steps",
            "1",
            "--rounds",
            "2",
            "--variant",
            "a:default",
            "--variant",
            "b:default:combo_kernels=True",
            "--step-sampling",
            "stratified",
            "--out",
            str(out),
        ]
    )
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
    monkeypatch.setattr(bench, "update_variants", lambda args, device: {"eager": (False, False, False, "uniform", None)})
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--only", "update", "--steps", "1", "--repeats", "3", "--batch-size", "8", "--out", str(out)])
    update = json.loads(out.read_text())["update"]
    assert update["partial"] is True and update["gflop_per_phase_b_step"] > 0
    assert update["setup_s"]["eager"] > 0
    assert len(update["rounds"]["eager"]) == 1 and update["rounds"]["eager"][0]["phase_b_steps_per_s"] > 0
    assert "eager" not in update  # no median of an unfinished run


def test_compare_revisions_times_each_revision_from_its_own_files(tmp_path):
    """Two revisions (here HEAD twice) in interleaved rounds, each importing its own copy of the
    package (written by git archive), with medians and new / old per variant and metric."""
    compare = load_benchmark("compare_revisions")
    with pytest.raises(SystemExit, match=r"--old/--new 'no-such-rev': not a commit"):
        compare.main(["--old", "no-such-rev", "--work-dir", str(tmp_path / "revs")])
    out = tmp_path / "cmp.json"
    args = ["--old", "HEAD", "--rounds", "2", "--work-dir", str(tmp_path / "revs"), "--out", str(out), "--"]
    result = compare.main(args + "--preset toy --only update --no-compile --steps 1 --batch-size 8".split())
    assert json.loads(out.read_text()) == result
    assert result["revisions"]["old"] == result["revisions"]["new"] and len(result["revisions"]["old"]) == 40
    assert (tmp_path / "revs" / result["revisions"]["old"][:12] / "torchrl_bdpo" / "__init__.py").exists()
    assert result["bench_args"][-2:] == ["--repeats", "1"]
    for label in ("old", "new"):
        assert len(result["rounds"][label]) == 2
        eager = result["median"][label]["eager"]
        assert eager["phase_b_steps_per_s"] > 0 and eager["pretrain_steps_per_s"] > 0
        rounds = [r["eager"]["phase_b_steps_per_s"] for r in result["rounds"][label]]
        assert eager["phase_b_steps_per_s"] == pytest.approx(sum(rounds) / 2)  # the median of two
    old, new = result["median"]["old"]["eager"], result["median"]["new"]["eager"]
    assert result["new_over_old"]["eager"]["phase_b_steps_per_s"] == pytest.approx(new["phase_b_steps_per_s"] / old["phase_b_steps_per_s"])
    per_round = [n["eager"]["phase_b_steps_per_s"] / o["eager"]["phase_b_steps_per_s"] for o, n in zip(result["rounds"]["old"], result["rounds"]["new"])]
    assert result["new_over_old_per_round"]["eager"]["phase_b_steps_per_s"] == pytest.approx(per_round)
    assert result["new_over_old_median_of_rounds"]["eager"]["phase_b_steps_per_s"] == pytest.approx(sum(per_round) / 2)
