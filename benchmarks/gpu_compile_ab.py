"""A/B of inductor settings for the compiled + CUDA-graph phase-B step (GPU; runs eager-free).

    python benchmarks/gpu_compile_ab.py --out ab.json      # default, forced GEMM padding, combo kernels, coordinate-descent tuning
    python benchmarks/gpu_compile_ab.py --variant default --variant autotune:max-autotune-no-cudagraphs
    python benchmarks/gpu_compile_ab.py --step-sampling stratified --variant default --variant pad:default:force_shape_pad=True

A variant is ``name:mode[:key=value,...]``: ``mode`` is ``torch.compile``'s (``default`` for
none), the ``key=value`` pairs patch ``torch._inductor.config`` while the variant compiles, or,
for the library's own settings (``fuse_narrow``: ``networks.set_fuse_narrow_linear`` on the
update's networks), those: ``sums:default:fuse_narrow=cuda`` builds the step with the networks'
narrow maps as fused sums (experimental; the default is GEMMs).
Every variant is built in one process, in the order given, and timed as soon as it is built;
then further rounds time all of them in turn (A B C A B C ...). D4RL preset (N=5, K=10,
M=10, batch 256), TF32 matmuls by default, and on a GPU each step's two losses on two CUDA
streams (``overlap_losses=True``, what the scripts run with CUDA graphs; ``--one-stream``:
one). Results are printed and written after every timing, so a run stopped by a time limit
keeps what it measured. Put slow variants last:
``max-autotune`` spends seconds of autotuning per GEMM shape and had not finished after 4.5
minutes on an H200, so it is not in the default list; give it a run of its own.
On a CPU (a smoke run only) the steps are compiled but not captured, and each variant's
reset of dynamo's cache makes the ones built before it compile again, untimed, on their next call.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config


sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_bdpo as bench  # noqa: E402

# At the D4RL sizes many GEMMs had a dim that is not a multiple of 4 floats (16 bytes), which TF32
# tensor-core kernels need: the input layers (K = 6 action, 17 observation, 23 both), the
# eps-networks' outputs (N = 6) and the ensembles' heads (N = 1); an H100 profile (2026-11-28)
# shows FFMA and gemv kernels taking ~125 us of a 1412 us critic step. sums: the networks write
# the maps with at most 8 inputs or outputs as sums on CUDA (networks.narrow_linear, experimental,
# off by default), fused into the kernels around them; pad:
# forced padding of the GEMMs left with such dims (the observation parts, K = 17; inductor pads
# only GEMMs it deems compute-bound unless forced)
DEFAULT_VARIANTS = (
    "default:default",
    "sums:default:fuse_narrow=cuda",
    "pad:default:force_shape_pad=True",
    "combo:default:combo_kernels=True",
    "coordesc:default:coordinate_descent_tuning=True",
)


# the library's settings, given to the update's networks (fuse_narrow: set_fuse_narrow_linear)
LIBRARY_SETTINGS = ("fuse_narrow",)


@contextlib.contextmanager
def patched(config: dict):
    """``config``'s inductor settings in force, restored on exit (the library's are not inductor's)."""
    with inductor_config.patch({k: v for k, v in config.items() if k not in LIBRARY_SETTINGS}):
        yield


def parse_variant(text: str) -> tuple[str, str | None, dict]:
    parts = text.split(":", 2)
    name, mode = parts[0], (parts[1] if len(parts) > 1 else "default")
    config = {}
    for item in filter(None, (parts[2].split(",") if len(parts) > 2 else [])):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text!r}: expected key=value pairs after the mode, got {item!r}.")
        if key not in LIBRARY_SETTINGS and not hasattr(inductor_config, key):
            raise SystemExit(
                f"--variant {text!r}: torch._inductor.config has no {key!r} in torch {torch.__version__}; "
                f"expected one of its settings, e.g. combo_kernels or coordinate_descent_tuning, or one of "
                f"the library's: {', '.join(LIBRARY_SETTINGS)}."
            )
        try:
            config[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            config[key] = value
    return name, None if mode == "default" else mode, config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/compile_ab.json"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variant", action="append", help=f"name:mode[:key=value,...] (default: {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--steps", type=int, default=200, help="timed critic and policy steps (behavior: 10x)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--matmul-precision", default="high", choices=("highest", "high", "medium"))
    p.add_argument("--one-stream", action="store_true", help="GPU: the losses on one CUDA stream (default: two)")
    p.add_argument(
        "--step-sampling",
        choices=("uniform", "stratified"),
        default="uniform",
        help="the loss's step_sampling in every variant (stratified: Q and V each on their own rows)",
    )
    args = p.parse_args(argv)
    device = torch.device(args.device)
    graphs = device.type == "cuda"
    overlap = graphs and not args.one_stream
    torch.set_float32_matmul_precision(args.matmul_precision)
    batch = bench.make_batch(256, device)
    out = {
        "device": torch.cuda.get_device_name(device) if graphs else "cpu",
        "torch": torch.__version__,
        "settings": {
            "preset": "d4rl",
            "matmul_precision": args.matmul_precision,
            "steps": args.steps,
            "cudagraphs": graphs,
            "overlap_losses": overlap,
            "step_sampling": args.step_sampling,
        },
        "built": {},
        "rounds": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def time_one(name, update):
        res = {"variant": name, **bench.time_steps(update, batch, args.steps, device)}
        out["rounds"].append(res)
        args.out.write_text(json.dumps(out, indent=2))
        print(json.dumps(res), flush=True)

    built = {}
    for text in args.variant or DEFAULT_VARIANTS:
        name, mode, config = parse_variant(text)
        # dynamo would reuse the previous variant's graphs (same code, same backend) and never
        # compile under this variant's settings; captured CUDA graphs replay without them
        torch._dynamo.reset()
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with patched(config):
            update = bench.make_update(
                device,
                compile=True,
                cudagraphs=graphs,
                N=5,
                compile_mode=mode,
                overlap_losses=overlap,
                step_sampling=args.step_sampling,
                fuse_narrow=config.get("fuse_narrow", False),
            )
            for _ in range(3):  # compilation, warm-up and capture happen here, under the patch
                last = update.critic(batch)
                update.policy(batch), update.behavior(batch)
            bench.sync(device)
        out["built"][name] = {"mode": mode, "config": config, "setup_s": time.perf_counter() - t0, "loss_qvalue_third_step": float(last["loss_qvalue"])}
        print(name, "built", json.dumps(out["built"][name]), flush=True)
        built[name] = update
        time_one(name, update)
    for _ in range(args.rounds - 1):
        for name, update in built.items():
            time_one(name, update)
    for name in built:
        rates = sorted(r["phase_b_steps_per_s"] for r in out["rounds"] if r["variant"] == name)
        print(name, "median phase-B steps/s", round(rates[len(rates) // 2], 1), flush=True)


if __name__ == "__main__":
    main()
