"""BDPO speed benchmarks: phase-B updates, acting, BDPO vs a full-chain (Diffusion-QL-style) actor, FLOP/s.

    python benchmarks/bench_bdpo.py --out benchmarks/results/cpu.json            # everything
    python benchmarks/bench_bdpo.py --only update --steps 5 --out /tmp/b.json    # one part

Every ratio is measured in the same run as its baseline. Random batches of
non-terminal transitions (the expensive case: every next state needs M x N chains).
Defaults are the D4RL ones: N=5, K=10 critics, M=10, batch 256, hidden 256.
"""
from __future__ import annotations

import argparse
import copy
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
from torchrl_bdpo.objectives import BDPOLoss

warnings.filterwarnings("ignore", message="No target network updater")
OBS, ACT = 17, 6  # halfcheetah/walker2d-sized


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


def matmul_peak(device, n=2048, reps=20):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sec = timed(lambda: a @ b, reps, device)
    return 2 * n**3 / sec / 1e9


def bench_update(args, device):
    """Phase-B steps/s: critics every step, actor + behavior every 5th (amortised), eager vs compiled."""
    loss = make_loss(device=device)
    batch = make_batch(args.batch_size, device)
    methods = {m: getattr(loss, m) for m in ("qvalue_loss", "value_loss", "actor_loss", "behavior_loss")}

    def step_fn(fns):
        def critic():
            (fns["qvalue_loss"](batch)[0] + fns["value_loss"](batch)[0]).backward()

        def policy():
            (fns["actor_loss"](batch)[0] + fns["behavior_loss"](batch)[0]).backward()

        return critic, policy

    out = {}
    critic, policy = step_fn(methods)
    t_c, t_p = timed(critic, args.steps, device), timed(policy, args.steps, device)
    out["eager"] = {"critic_s": t_c, "actor_behavior_s": t_p, "phase_b_steps_per_s": 1 / (t_c + t_p / 5)}
    with FlopCounterMode(display=False) as fc:
        critic()
    critic_flops = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        policy()
    policy_flops = fc.get_total_flops()
    flops = critic_flops + policy_flops / 5
    out["gflop_per_phase_b_step"] = flops / 1e9
    out["eager"]["gflops_per_s"] = flops / (t_c + t_p / 5) / 1e9
    if not args.no_compile:
        t0 = time.perf_counter()
        compiled = {k: torch.compile(v) for k, v in methods.items()}
        critic, policy = step_fn(compiled)
        critic(), policy()
        out["compile_time_s"] = time.perf_counter() - t0
        t_c, t_p = timed(critic, args.steps, device), timed(policy, args.steps, device)
        out["compiled"] = {
            "critic_s": t_c,
            "actor_behavior_s": t_p,
            "phase_b_steps_per_s": 1 / (t_c + t_p / 5),
            "gflops_per_s": flops / (t_c + t_p / 5) / 1e9,
        }
        out["compiled_over_eager"] = out["compiled"]["phase_b_steps_per_s"] / out["eager"]["phase_b_steps_per_s"]
    return out


def bench_acting(args, device):
    """Best-of-10 acting latency at batch 1 and throughput at batch 256 (N=5, target actor, ensemble-mean Q)."""
    loss = make_loss(device=device)
    acting = loss.make_acting_module(num_candidates=10)
    out = {}
    for B in (1, 256):
        td = TensorDict({"observation": torch.randn(B, OBS, device=device)}, [B])
        sec = timed(lambda: acting(td), max(args.steps, 20), device)
        out[f"batch_{B}"] = {"latency_ms": sec * 1e3, "actions_per_s": B / sec}
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
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", choices=("update", "acting", "actor_cost"), action="append")
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    parts = args.only or ["update", "acting", "actor_cost"]
    result = {
        "date": str(date.today()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "settings": {"N": 5, "K": 10, "M": 10, "batch": args.batch_size, "hidden": 256, "obs_dim": OBS, "act_dim": ACT, "steps": args.steps},
        "matmul_peak_gflops": matmul_peak(device),
    }
    for part in parts:
        result[part] = {"update": bench_update, "acting": bench_acting, "actor_cost": bench_actor_cost}[part](args, device)
        print(part, json.dumps(result[part], indent=1))
    if "update" in result:
        best = max(v.get("gflops_per_s", 0) for v in result["update"].values() if isinstance(v, dict))
        result["update"]["fraction_of_matmul_peak"] = best / result["matmul_peak_gflops"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()
