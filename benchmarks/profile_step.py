"""Kernel profile of one compiled phase-B step (no CUDA graphs): what a graph replay has to run.

    python benchmarks/profile_step.py --out benchmarks/results/profile.json   # D4RL defaults
    python benchmarks/profile_step.py --overlap --step-sampling stratified     # two streams, stratified steps

For each of the critic step and the actor + behavior step it reports, per step, the number of
device kernels (CPU ops on a CPU), their summed time, that time per CUDA stream (``--overlap``:
the two branches of ``BDPOUpdate(overlap_losses=True)``), the 25 most expensive kernel names,
and the GEMM calls (ATen ``mm``, ``bmm``, ``addmm``, ``baddbmm``: one cuBLAS kernel or more each
on a GPU). Under CUDA graphs the launches disappear but every kernel still runs: the kernel
count times a few microseconds and the summed kernel time bound what a graphed step can reach.

On a CPU, ``--like-gpu`` compiles the graphs a GPU compiles (no ensemble row chunks, both target
ensembles on every row rather than Q on the ~B/N rows a host read finds) and ``--fuse-narrow
true`` writes the networks' narrow maps as sums as on CUDA (``networks.FUSE_NARROW_LINEAR``): the
GEMM count of a GPU step, counted without one::

    python benchmarks/profile_step.py --like-gpu --fuse-narrow true --steps 1
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import sys

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_bdpo as bench  # noqa: E402  (the benchmark's own models and batches)
from torchrl_bdpo.diffusion import networks  # noqa: E402
from torchrl_bdpo.objectives import BDPOLoss  # noqa: E402

GEMMS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_addmm_activation")


class _GpuLikeLoss(BDPOLoss):
    """BDPOLoss whose compiled CPU graphs are a GPU's: no Q-row capacity (a host read)."""

    def _q_capacity_for(self, step_prev):
        return None


def kernel_table(prof, steps: int, device_type: DeviceType, top: int = 25) -> dict:
    total_us, count, per_stream = defaultdict(float), defaultdict(int), defaultdict(float)
    for e in prof.events():
        if e.device_type != device_type or getattr(e, "is_user_annotation", False):
            continue  # GPU-side ranges of record_function (e.g. Optimizer.step) span kernels counted apart
        if device_type == DeviceType.CPU and e.cpu_parent is not None:
            continue  # top-level CPU ops only: no double counting
        total_us[e.name] += e.time_range.elapsed_us()
        count[e.name] += 1
        per_stream[e.device_resource_id] += e.time_range.elapsed_us()  # CUDA: the stream; CPU: the thread
    names = sorted(total_us, key=total_us.get, reverse=True)
    gemms = sum(1 for e in prof.events() if e.device_type == DeviceType.CPU and e.name in GEMMS)
    return {
        "gemm_calls_per_step": gemms / steps,
        "kernels_per_step": sum(count.values()) / steps,
        "kernel_us_per_step": sum(total_us.values()) / steps,
        # with overlap_losses, the two branches' kernel time: the step's lower bound is the larger
        "kernel_us_per_stream": {str(k): v / steps for k, v in sorted(per_stream.items(), key=lambda kv: -kv[1])},
        "top": [
            {"name": n[:120], "calls_per_step": count[n] / steps, "us_per_step": total_us[n] / steps}
            for n in names[:top]
        ],
    }


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
        "--step-sampling", choices=("uniform", "stratified"), default="uniform",
        help="the loss's step_sampling (stratified: each row through one of the Q and V ensembles)",
    )
    p.add_argument(
        "--fuse-narrow", choices=("default", "true", "false"), default="default",
        help="networks.FUSE_NARROW_LINEAR for the run: default ('cuda': sums on CUDA), true (every device), false (GEMMs)",
    )
    p.add_argument(
        "--like-gpu", action="store_true",
        help="CPU: compile the graphs a GPU compiles (no ensemble row chunks, no Q-row capacity)",
    )
    args = p.parse_args(argv)
    fuse = networks.FUSE_NARROW_LINEAR if args.fuse_narrow == "default" else args.fuse_narrow == "true"
    with networks.fuse_narrow_linear(fuse):  # restored after: main() may run inside another process's tests
        return profile_steps(args)


def profile_steps(args) -> dict:
    device = torch.device(args.device)
    torch.set_float32_matmul_precision(args.matmul_precision)
    torch.manual_seed(0)
    update = bench.make_update(
        device, compile=not args.no_compile, cudagraphs=False, overlap_losses=args.overlap, step_sampling=args.step_sampling
    )
    if args.like_gpu:  # before the first call: compilation is lazy, and the loss methods look the capacity up on it
        update.loss.__class__ = _GpuLikeLoss
        update.loss.ensemble_chunk_rows = None
    batch = bench.make_batch(args.batch_size, device)
    for _ in range(3):
        update.critic(batch), update.policy(batch)
    bench.sync(device)
    kind = DeviceType.CUDA if device.type == "cuda" else DeviceType.CPU
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "matmul_precision": args.matmul_precision,
              "compiled": not args.no_compile, "overlap_losses": args.overlap, "step_sampling": args.step_sampling,
              "fuse_narrow_linear": networks.FUSE_NARROW_LINEAR, "like_gpu": args.like_gpu}
    for name, fn in (("critic_step", update.critic), ("actor_behavior_step", update.policy)):
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                fn(batch)
            bench.sync(device)
        result[name] = kernel_table(prof, args.steps, kind)
        print(name, json.dumps({k: v for k, v in result[name].items() if k != "top"}), flush=True)
        for row in result[name]["top"][:12]:
            print(f"  {row['us_per_step']:9.1f} us  x{row['calls_per_step']:5.1f}  {row['name']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()
