"""BDPO speed benchmarks: phase-B updates, acting, BDPO vs a full-chain (Diffusion-QL-style) actor, FLOP/s.

    python benchmarks/bench_bdpo.py --out benchmarks/results/cpu.json            # everything
    python benchmarks/bench_bdpo.py --only update --steps 5 --out /tmp/b.json    # one part

Every ratio is measured in the same run as its baseline. Random batches of
non-terminal transitions (the expensive case: every next state needs M x N chains).
Defaults are the D4RL ones: N=5, K=10 critics, M=10, batch 256, hidden 256;
``--preset toy`` takes the paper's toy 2D ones: N=50, batch 512, 1-D observation, 2-D action.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from datetime import date
from pathlib import Path

import torch
from tensordict import TensorDict
from torch.utils.flop_counter import FlopCounterMode

from torchrl_bdpo.diffusion import (
    DiffusionActor,
    EpsilonNetwork,
    make_qvalue_operator,
    make_schedule,
    make_value_operator,
)
from torchrl_bdpo.objectives import BDPOLoss, BDPOUpdate

warnings.filterwarnings("ignore", message="No target network updater")
OBS, ACT = 17, 6  # halfcheetah/walker2d-sized
PRESETS = {  # the settings the authors' figures in the speed issue were measured at
    "d4rl": {"N": 5, "obs_dim": 17, "act_dim": 6, "batch": 256},
    "toy": {"N": 50, "obs_dim": 1, "act_dim": 2, "batch": 512},
}


def make_loss(N=5, K=10, M=10, hidden=256, device="cpu"):
    def actor():
        return DiffusionActor(EpsilonNetwork(ACT, OBS, hidden=hidden, depth=4), make_schedule("vp", N), clip_denoised=True)

    loss = BDPOLoss(
        actor(), actor(), make_value_operator(OBS, ACT, hidden=hidden), make_qvalue_operator(OBS, ACT, hidden=hidden),
        eta=0.15, rho=1.0, num_qvalue_nets=K, num_samples=M,
    )
    return loss.to(device)


def make_batch(B=256, device="cpu"):
    return TensorDict(
        {
            "observation": torch.randn(B, OBS),
            "action": torch.rand(B, ACT) * 2 - 1,
            ("next", "observation"): torch.randn(B, OBS),
            ("next", "reward"): torch.randn(B, 1),
            ("next", "terminated"): torch.zeros(B, 1, dtype=torch.bool),
            ("next", "done"): torch.zeros(B, 1, dtype=torch.bool),
        },
        [B],
    ).to(device)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, steps, device, warmup=2):
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / steps


def matmul_peak(device, n=None, reps=20):
    """fp32 matmul GFLOP/s (the update runs in fp32; TF32 stays off, torch's default)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sec = timed(lambda: a @ b, reps, device)
    return 2 * n**3 / sec / 1e9


def variants(args, device) -> dict:
    """Which (compile, cudagraphs) pairs to time: eager and compiled everywhere, CUDA graphs on a GPU."""
    out = {"eager": (False, False)}
    if device.type == "cuda":
        out["cudagraphs"] = (False, True)
    if not args.no_compile:
        out["compiled"] = (True, False)
        if device.type == "cuda":
            out["compiled_cudagraphs"] = (True, True)
    return out


def make_update(device, compile=False, cudagraphs=False, N=5, adam="fused"):
    loss = make_loss(N=N, device=device)
    fused = None if adam == "foreach" else True  # fused, as the scripts do; foreach: CUDA's default
    optimizers = {g: torch.optim.Adam(p, lr=3e-4, fused=fused) for g, p in BDPOUpdate.param_groups(loss).items()}
    updaters = dict(zip(("critic", "actor", "behavior"), loss.make_target_updaters(tau=0.005)))
    return BDPOUpdate(loss, optimizers, updaters, grad_clip=1.0, compile=compile, cudagraphs=cudagraphs)


def bench_update(args, device):
    """Phase-B steps/s of full optimizer steps (critics every step, actor + behavior every 5th, amortised)
    and phase-A (behavior pretraining) steps/s."""
    batch = make_batch(args.batch_size, device)
    out = {}
    flops = None
    for name, (compile, cudagraphs) in variants(args, device).items():
        torch.manual_seed(0)
        update = make_update(device, compile, cudagraphs, N=args.N, adam=args.adam)
        t0 = time.perf_counter()
        for _ in range(3):  # first (eager) call, compilation, warm-up and capture
            update.critic(batch), update.policy(batch)
        sync(device)
        setup_s = time.perf_counter() - t0
        if flops is None:  # counted on the eager update
            with FlopCounterMode(display=False) as fc:
                update.critic(batch)
            critic_flops = fc.get_total_flops()
            with FlopCounterMode(display=False) as fc:
                update.policy(batch)
            flops = critic_flops + fc.get_total_flops() / 5
            out["gflop_per_phase_b_step"] = flops / 1e9
        steps = args.steps * (args.graph_factor if cudagraphs else 1)
        t_c = timed(lambda: update.critic(batch), steps, device)
        t_p = timed(lambda: update.policy(batch), steps, device)
        t_b = timed(lambda: update.behavior(batch), steps * 10, device)
        step_s = t_c + t_p / 5
        out[name] = {
            "critic_step_s": t_c,
            "actor_behavior_step_s": t_p,
            "phase_b_steps_per_s": 1 / step_s,
            "pretrain_steps_per_s": 1 / t_b,
            "gflops_per_s": flops / step_s / 1e9,
            "setup_s": setup_s,
            "timed_steps": steps,
        }
        print(name, json.dumps(out[name]), flush=True)
    for name in out:
        if isinstance(out[name], dict) and name != "eager":
            out[name]["speedup_over_eager"] = out[name]["phase_b_steps_per_s"] / out["eager"]["phase_b_steps_per_s"]
    return out


def bench_acting(args, device):
    """Best-of-10 acting latency at batch 1 and throughput at batch 256 (N=5, target actor, ensemble-mean Q)."""
    loss = make_loss(N=args.N, device=device)
    out = {}
    for name, (compile, cudagraphs) in variants(args, device).items():
        acting = loss.make_acting_module(num_candidates=10, compile=compile, cudagraphs=cudagraphs, validate=False)
        res = {}
        for B in (1, 256):
            td = TensorDict({"observation": torch.randn(B, OBS, device=device)}, [B])
            for _ in range(3):
                acting(td)
            steps = max(args.steps, 20) * (args.graph_factor if cudagraphs else 1)
            sec = timed(lambda: acting(td), steps, device)
            res[f"batch_{B}"] = {"latency_ms": sec * 1e3, "actions_per_s": B / sec}
        out[name] = res
        print("acting", name, json.dumps(res), flush=True)
    return out


def bench_actor_cost(args, device):
    """BDPO's one-step actor update vs a Diffusion-QL-style update through the whole chain, same networks."""
    out = {}
    for N in (5, 20, 50):
        loss = make_loss(N=N, device=device)
        batch = make_batch(args.batch_size, device)

        def bdpo():
            loss.actor_loss(batch)[0].backward()

        actor = loss.actor_network
        q_op = loss.qvalue_network
        params, q_params = loss.actor_network_params, loss.target_qvalue_network_params[0]

        def full_chain():
            with params.to_module(actor):
                a0 = actor.sample_path(batch["observation"]).action  # gradient through all N steps
            with q_params.to_module(q_op):
                q = q_op.module(batch["observation"], a0)
            (-q.mean()).backward()

        out[f"N={N}"] = {"bdpo_actor_s": timed(bdpo, args.steps, device), "full_chain_actor_s": timed(full_chain, args.steps, device)}
    base = out["N=5"]
    for v in out.values():
        v["bdpo_over_bdpo_N5"] = v["bdpo_actor_s"] / base["bdpo_actor_s"]
        v["full_chain_over_full_chain_N5"] = v["full_chain_actor_s"] / base["full_chain_actor_s"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/latest.json"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--preset", choices=tuple(PRESETS), default="d4rl", help="d4rl: N=5, batch 256; toy: N=50, batch 512")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", choices=("update", "acting", "actor_cost"), action="append")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument(
        "--matmul-precision", default="highest", choices=("highest", "high", "medium"),
        help="torch.set_float32_matmul_precision: 'high' allows TF32 on GPUs (JAX's GPU default)",
    )
    p.add_argument("--adam", choices=("fused", "foreach"), default="fused", help="Adam implementation (the scripts use fused)")
    p.add_argument("--graph-factor", type=int, default=20, help="timed steps x this for CUDA-graph variants")
    args = p.parse_args(argv)
    global OBS, ACT
    preset = PRESETS[args.preset]
    OBS, ACT, args.N = preset["obs_dim"], preset["act_dim"], preset["N"]
    args.batch_size = args.batch_size or preset["batch"]
    device = torch.device(args.device)
    torch.set_float32_matmul_precision(args.matmul_precision)
    torch.manual_seed(0)
    parts = args.only or ["acting", "update", "actor_cost"]
    result = {
        "date": str(date.today()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "settings": {"preset": args.preset, "N": args.N, "K": 10, "M": 10, "batch": args.batch_size, "hidden": 256, "obs_dim": OBS, "act_dim": ACT, "steps": args.steps, "matmul_precision": args.matmul_precision, "adam": args.adam},
        "matmul_peak_gflops": matmul_peak(device),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for part in parts:  # the JSON is rewritten after each part: a run cut short keeps what it measured
        result[part] = {"update": bench_update, "acting": bench_acting, "actor_cost": bench_actor_cost}[part](args, device)
        print(part, json.dumps(result[part], indent=1))
        if part == "update":
            best = max(v.get("gflops_per_s", 0) for v in result["update"].values() if isinstance(v, dict))
            result["update"]["best_fraction_of_matmul_peak"] = best / result["matmul_peak_gflops"]
        args.out.write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()
