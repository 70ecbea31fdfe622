"""Where a pretraining (behavior) step's time goes, against a bare MLP step of the same sizes.

    python benchmarks/pretrain_overhead.py --preset toy --out benchmarks/results/pretrain_overhead.json

The regular behavior step of :class:`~torchrl_bdpo.training.BDPOUpdate` is timed in parts
(zero_grad, the compiled loss's forward, backward, gradient clip, Adam, target EMA, the output
TensorDict), whole (``update.behavior``: on a CPU, since 2026-11-27, the functional program of
loss, gradients and clip, which skips most of the regular step's fixed cost), and next to ``bench_bdpo.bare_mlp_step`` (a compiled
``nn.Sequential`` with the behavior network's layer sizes and fused Adam, no clip or EMA), at the
preset's batch or at ``--batch-size``. At batch 8 the arithmetic is negligible: what remains is
each step's fixed cost (Python, dispatch, dynamo's guards), so a run at 8 and one at the preset's
batch separate a fixed overhead from a per-row one. One batch size per run; rounds alternate the
variants (the VM's speed drifts: compare the ratios of one run, not times across runs); medians
and every round go to the JSON.

    python benchmarks/pretrain_overhead.py --preset toy --batch-size 8 --out benchmarks/results/pretrain_overhead_b8.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from tensordict import TensorDict

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_bdpo as bench  # noqa: E402  (the benchmark's own models and batches)

PARTS = ("zero_grad", "loss_forward", "backward", "clip", "adam", "ema", "output")


def make_parts(update, batch):
    """A behavior step written out with a timer between its parts; returns ``(step, totals)``."""
    fn = update._fns["behavior_loss"]
    opt, ema = update.optimizers["behavior"], update.updaters["behavior"]
    params = update._params["behavior"]
    totals = dict.fromkeys(PARTS, 0.0)
    clock = time.perf_counter

    def step():
        t = [clock()]
        opt.zero_grad(set_to_none=True)
        t.append(clock())
        loss, _ = fn(batch)
        t.append(clock())
        loss.backward()
        t.append(clock())
        out = {"loss_behavior": loss.detach()}
        out["grad_norm_behavior"] = torch.nn.utils.clip_grad_norm_(params, update.grad_clip)
        t.append(clock())
        opt.step()
        t.append(clock())
        ema.step()
        t.append(clock())
        TensorDict(out)
        t.append(clock())
        for name, a, b in zip(PARTS, t, t[1:]):
            totals[name] += b - a

    return step, totals


def measure(batch_size: int, args, device) -> dict:
    torch.manual_seed(0)
    update = bench.make_update(device, compile=not args.no_compile, N=args.N)
    batch = bench.make_batch(batch_size, device, terminal=args.terminal)
    bare = bench.bare_mlp_step(device, batch_size, compile=not args.no_compile)
    parts, totals = make_parts(update, batch)
    whole = {"behavior_step": lambda: update.behavior(batch), "bare_mlp_step": bare}
    for _ in range(3):  # first (eager) call and compilation
        parts(), update.behavior(batch), bare()
    rounds = []
    for _ in range(args.repeats):
        r = {name: bench.timed(fn, args.steps, device) * 1e6 for name, fn in whole.items()}
        for k in totals:
            totals[k] = 0.0
        r["parts_sum"] = bench.timed(parts, args.steps, device, warmup=0) * 1e6
        r.update({k: v / args.steps * 1e6 for k, v in totals.items()})
        rounds.append(r)
    out = {f"{k}_us": statistics.median(r[k] for r in rounds) for k in rounds[0]}
    out["behavior_over_bare"] = statistics.median(r["behavior_step"] / r["bare_mlp_step"] for r in rounds)
    out["rounds_us"] = rounds
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pretrain_overhead.json"))
    p.add_argument("--preset", choices=tuple(bench.PRESETS), default="toy")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--steps", type=int, default=100, help="steps per timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    for name in ("steps", "repeats", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)}: expected an integer >= 1.")
    preset = bench.PRESETS[args.preset]
    args.N, args.terminal = preset["N"], preset["terminal"]
    dims = bench.OBS, bench.ACT
    bench.OBS, bench.ACT = preset["obs_dim"], preset["act_dim"]
    try:
        return run(args, preset)
    finally:
        bench.OBS, bench.ACT = dims  # the shared module's dimensions, as they were


def run(args, preset) -> dict:
    B = args.batch_size or preset["batch"]
    device = torch.device(args.device)
    result = {
        "date": str(date.today()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "settings": {"preset": args.preset, "N": args.N, "steps": args.steps, "repeats": args.repeats, "compiled": not args.no_compile},
    }
    result[f"batch_{B}"] = res = measure(B, args, device)
    print(f"batch {B}", json.dumps({k: round(v, 1) for k, v in res.items() if k != "rounds_us"}), flush=True)
    return bench.write_result(args.out, result)


if __name__ == "__main__":
    main()
