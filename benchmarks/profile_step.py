"""Kernel profile of one compiled phase-B step: what a graph replay has to run, and how it runs.

    python benchmarks/profile_step.py --out benchmarks/results/profile.json   # D4RL defaults
    python benchmarks/profile_step.py --overlap --step-sampling stratified     # two streams, stratified steps
    python benchmarks/profile_step.py --overlap --cudagraphs                   # GPU: the graph replays themselves

For each of the critic step and the actor + behavior step it reports, per step, the number of
device kernels (CPU ops on a CPU), their summed time, that time per CUDA stream (``--overlap``:
the two branches of ``BDPOUpdate(overlap_losses=True)``), the 25 most expensive kernel names,
and the GEMM calls (ATen ``mm``, ``bmm``, ``addmm``, ``baddbmm``: one cuBLAS kernel or more each
on a GPU). Under CUDA graphs the launches disappear but every kernel still runs: the kernel
count times a few microseconds and the summed kernel time bound what a graphed step can reach.

The timeline of each step says where the rest of a step's time goes: ``busy_us_per_step`` (the
time at least one kernel runs: the union of the kernels' intervals over all streams),
``overlap_us_per_step`` (summed kernel time minus that: how much the two streams ran side by
side), ``span_us_per_step`` (the profiled steps' first kernel start to their last kernel end,
divided by the number of steps: waits between steps count) and ``idle_us_per_step`` (span minus
busy: the device waits, between dependent kernels or for the host). Timed again without the profiler: ``wall_us_per_step`` (synchronised loop) and
``host_us_per_call`` (until the call returns, unsynchronised): a host time near the wall time
means the host bounds the step, an idle time near it with a small host time means the gaps
between dependent kernels do. ``--cudagraphs`` (CUDA) profiles the captured steps' replays, the
scripts' GPU configuration; the CPU-side ATen calls do not run in a replay, so their GEMM count is
``null`` there (profile without it for that).

On a CPU, ``--like-gpu`` compiles the graphs a GPU compiles (no ensemble row chunks, both target
ensembles on every row rather than Q on the ~B/N rows a host read finds) and ``--fuse-narrow
true`` writes the networks' narrow maps as sums as on CUDA (``set_fuse_narrow_linear``): the
GEMM count of a GPU step, counted without one::

    python benchmarks/profile_step.py --like-gpu --fuse-narrow true --steps 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import defaultdict
from pathlib import Path

import sys

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_bdpo as bench  # noqa: E402  (the benchmark's own models and batches)
from torchrl_bdpo.objectives import BDPOLoss  # noqa: E402

GEMMS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_addmm_activation")


class _GpuLikeLoss(BDPOLoss):
    """BDPOLoss whose compiled CPU graphs are a GPU's: no Q-row capacity (a host read)."""

    def _q_target_rows(self, step_prev):
        return None


def timeline(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """``(busy, span)`` of ``(start, end)`` intervals: the length of their union and from the first
    start to the last end (0 and 0 for none)."""
    ordered = sorted(intervals)
    if not ordered:
        return 0.0, 0.0
    busy, (cur_start, cur_end) = 0.0, ordered[0]
    for start, end in ordered[1:]:
        if start > cur_end:  # a gap: the merged interval so far is done
            busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    # the last merged interval ends with the latest end
    return busy + cur_end - cur_start, cur_end - ordered[0][0]


def kernel_table(prof, steps: int, device_type: DeviceType, top: int = 25, count_gemms: bool = True) -> dict:
    total_us, count, per_stream = defaultdict(float), defaultdict(int), defaultdict(float)
    intervals = []
    for e in prof.events():
        if e.device_type != device_type or getattr(e, "is_user_annotation", False):
            continue  # GPU-side ranges of record_function (e.g. Optimizer.step) span kernels counted apart
        if device_type == DeviceType.CPU and e.cpu_parent is not None:
            continue  # top-level CPU ops only: no double counting
        total_us[e.name] += e.time_range.elapsed_us()
        count[e.name] += 1
        per_stream[e.device_resource_id] += e.time_range.elapsed_us()  # CUDA: the stream; CPU: the thread
        intervals.append((e.time_range.start, e.time_range.end))
    names = sorted(total_us, key=total_us.get, reverse=True)
    gemms = sum(1 for e in prof.events() if e.device_type == DeviceType.CPU and e.name in GEMMS)
    kernel_us = sum(total_us.values())
    busy, span = timeline(intervals)
    return {
        "gemm_calls_per_step": gemms / steps if count_gemms else None,
        "kernels_per_step": sum(count.values()) / steps,
        "kernel_us_per_step": kernel_us / steps,
        # with overlap_losses, the two branches' kernel time: the step's lower bound is the larger
        "kernel_us_per_stream": {str(k): v / steps for k, v in sorted(per_stream.items(), key=lambda kv: -kv[1])},
        "busy_us_per_step": busy / steps,
        "overlap_us_per_step": (kernel_us - busy) / steps,
        "span_us_per_step": span / steps,
        "idle_us_per_step": (span - busy) / steps,
        "top": [{"name": n[:120], "calls_per_step": count[n] / steps, "us_per_step": total_us[n] / steps} for n in names[:top]],
    }


def wall_and_host(fn, batch, steps: int, device) -> dict:
    """The step timed without the profiler: synchronised wall time per step, and the host's time
    per call until it returns (the device may still run it), each the best of 3 rounds."""
    wall, host = [], []
    for _ in range(3):
        bench.sync(device)
        t0, spent = time.perf_counter(), 0.0
        for _ in range(steps):
            t = time.perf_counter()
            fn(batch)
            spent += time.perf_counter() - t
        bench.sync(device)
        wall.append((time.perf_counter() - t0) / steps * 1e6)
        host.append(spent / steps * 1e6)
    return {"wall_us_per_step": min(wall), "host_us_per_call": min(host)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/profile.json"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--matmul-precision", default="high", choices=("highest", "high", "medium"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--overlap", action="store_true", help="BDPOUpdate(overlap_losses=True): kernel time per stream (GPU)")
    p.add_argument(
        "--cudagraphs",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="CUDA: profile the captured steps' replays (gpu_check.sh's profile mode turns it on)",
    )
    p.add_argument(
        "--step-sampling",
        choices=("uniform", "stratified"),
        default="uniform",
        help="the loss's step_sampling (stratified: each row through one of the Q and V ensembles)",
    )
    p.add_argument(
        "--fuse-narrow",
        choices=("false", "cuda", "true"),
        default="false",
        help="the networks' narrow-map setting (set_fuse_narrow_linear): false (GEMMs, the library's default), "
        "cuda (sums on CUDA tensors), true (sums on every device)",
    )
    p.add_argument("--like-gpu", action="store_true", help="CPU: compile the graphs a GPU compiles (no ensemble row chunks, no Q-row capacity)")
    args = p.parse_args(argv)
    if args.cudagraphs and not str(args.device).startswith("cuda"):
        p.error(
            f"--cudagraphs profiles CUDA-graph replays, but --device is {args.device!r}: run it on a CUDA "
            f"device (--device cuda), or leave --cudagraphs out to profile the compiled step."
        )
    if args.steps < 1:
        p.error(f"--steps={args.steps}: expected an integer >= 1.")
    args.fuse_narrow = {"false": False, "cuda": "cuda", "true": True}[args.fuse_narrow]
    return profile_steps(args)


def profile_steps(args) -> dict:
    device = torch.device(args.device)
    torch.set_float32_matmul_precision(args.matmul_precision)
    torch.manual_seed(0)
    update = bench.make_update(
        device,
        compile=not args.no_compile,
        cudagraphs=args.cudagraphs,
        overlap_losses=args.overlap,
        step_sampling=args.step_sampling,
        fuse_narrow=args.fuse_narrow,
    )
    if args.like_gpu:  # before the first call: compilation is lazy, and the loss methods look the capacity up on it
        update.loss.__class__ = _GpuLikeLoss
        update.loss.speed = dataclasses.replace(update.loss.speed, ensemble_chunk_rows=None)
    batch = bench.make_batch(args.batch_size, device)
    for _ in range(5 if args.cudagraphs else 3):  # graphed: eager, compiling warm-ups, capture, a replay
        update.critic(batch), update.policy(batch)
    bench.sync(device)
    kind = DeviceType.CUDA if device.type == "cuda" else DeviceType.CPU
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "matmul_precision": args.matmul_precision,
        "compiled": not args.no_compile,
        "cudagraphs": args.cudagraphs,
        "overlap_losses": args.overlap,
        "step_sampling": args.step_sampling,
        "fuse_narrow_linear": args.fuse_narrow,
        "like_gpu": args.like_gpu,
    }
    for name, fn in (("critic_step", update.critic), ("actor_behavior_step", update.policy)):
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                fn(batch)
            bench.sync(device)
        result[name] = kernel_table(prof, args.steps, kind, count_gemms=not args.cudagraphs)
        result[name].update(wall_and_host(fn, batch, args.steps, device))
        if not result[name]["kernels_per_step"]:
            print(
                f"{name}: the profiler recorded no {kind.name} kernels (CUDA-graph replays need a CUPTI that "
                f"traces graph kernels): the kernel figures are missing, not zero; run with --no-cudagraphs",
                flush=True,
            )
        print(name, json.dumps({k: v for k, v in result[name].items() if k != "top"}), flush=True)
        for row in result[name]["top"][:12]:
            print(f"  {row['us_per_step']:9.1f} us  x{row['calls_per_step']:5.1f}  {row['name']}")
    return bench.write_result(args.out, result)


if __name__ == "__main__":
    main()
