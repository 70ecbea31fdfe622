"""BDPO speed benchmarks: phase-B updates, acting, BDPO vs a full-chain (Diffusion-QL-style) actor, FLOP/s.

    python benchmarks/bench_bdpo.py --out benchmarks/results/cpu.json            # everything
    python benchmarks/bench_bdpo.py --only update --steps 5 --out /tmp/b.json    # one part

Every ratio is measured in the same run as its baseline. Random batches; at the D4RL
defaults of non-terminal transitions (the expensive case: every next state needs M x N
chains). Defaults are the D4RL ones: N=5, K=10 critics, M=10, batch 256, hidden 256;
``--preset toy`` takes the paper's toy 2D ones: N=50, batch 512, 1-D observation, 2-D action,
and terminal transitions, as the toy bandits' are (``--terminal none`` times them live).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import traceback
import warnings
from datetime import date
from pathlib import Path

import torch
from tensordict import TensorDict
from torch.utils.flop_counter import FlopCounterMode

from torchrl_bdpo.diffusion import DiffusionActor, EpsilonNetwork, make_qvalue_operator, make_schedule, make_value_operator
from torchrl_bdpo.diffusion import networks
from torchrl_bdpo.diffusion.networks import mlp
from torchrl_bdpo.objectives import BDPOLoss
from torchrl_bdpo.speed import SpeedOptions
from torchrl_bdpo.training import BDPOUpdate

warnings.filterwarnings("ignore", message="No target network updater")
OBS, ACT = 17, 6  # halfcheetah/walker2d-sized
PRESETS = {  # the settings the authors' figures in the speed issue were measured at
    "d4rl": {"N": 5, "obs_dim": 17, "act_dim": 6, "batch": 256, "terminal": False},
    "toy": {"N": 50, "obs_dim": 1, "act_dim": 2, "batch": 512, "terminal": True},  # bandits: every transition ends
}


def make_loss(N=5, K=10, M=10, hidden=256, device="cpu", step_sampling="uniform", ensemble_chunk_compile=None):
    def actor():
        return DiffusionActor(EpsilonNetwork(ACT, OBS, hidden=hidden, depth=4), make_schedule("vp", N), clip_denoised=True)

    loss = BDPOLoss(
        actor(),
        actor(),
        make_value_operator(OBS, ACT, hidden=hidden, num_steps=N),
        make_qvalue_operator(OBS, ACT, hidden=hidden),
        eta=0.15,
        rho=1.0,
        num_qvalue_nets=K,
        num_samples=M,
        step_sampling=step_sampling,
        speed=SpeedOptions(ensemble_chunk_compile=ensemble_chunk_compile),
    )
    return loss.to(device)


def make_batch(B=256, device="cpu", terminal=False):
    """A random batch; ``terminal``: every next state terminal (a bandit's), else none."""
    return TensorDict(
        {
            "observation": torch.randn(B, OBS),
            "action": torch.rand(B, ACT) * 2 - 1,
            ("next", "observation"): torch.randn(B, OBS),
            ("next", "reward"): torch.randn(B, 1),
            ("next", "terminated"): torch.full((B, 1), terminal),
            ("next", "done"): torch.full((B, 1), terminal),
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


def update_variants(args, device) -> dict:
    """:func:`variants` as ``(compile, cudagraphs, overlap_losses, step_sampling, fuse_narrow)``: on a
    GPU each graphed variant again with the losses on two CUDA streams
    (``BDPOUpdate(overlap_losses=True)``); with ``--step-sampling both``, the fastest kind of step
    again with stratified steps (``<name>_stratified``: compiled on a CPU, compiled + graphs (+ two
    streams) on a GPU); on a GPU, the fastest compiled kind again with the networks' narrow maps as
    fused sums (``<name>_sums``: its networks built with ``fuse_narrow="cuda"``, experimental; the
    others with the library's default, GEMMs), unless ``--no-narrow-ab``."""
    sampling = "stratified" if args.step_sampling == "stratified" else "uniform"
    out = {name: (c, g, False, sampling, None) for name, (c, g) in variants(args, device).items()}
    if device.type == "cuda" and not args.no_overlap:
        out.update({f"{name}_overlap": (c, g, True, sampling, None) for name, (c, g, *_) in list(out.items()) if g})
    fastest = [name for name in ("compiled_cudagraphs_overlap", "compiled_cudagraphs", "compiled") if name in out][:1]
    if args.step_sampling == "both":
        out.update({f"{name}_stratified": (*out[name][:3], "stratified", None) for name in fastest})
    if device.type == "cuda" and not args.no_narrow_ab:
        out.update({f"{name}_sums": (*out[name][:4], "cuda") for name in fastest})
    return out


def make_update(
    device, compile=False, cudagraphs=False, N=5, adam="fused", compile_mode=None, overlap_losses=False, step_sampling="uniform", fuse_narrow=False
):
    """The update of :func:`make_loss`, as the scripts build it; ``fuse_narrow``: its networks'
    narrow-map setting (``networks.set_fuse_narrow_linear``, set before anything is compiled).
    Compiled steps without CUDA graphs run the ensembles' row chunks (CPU) through their own
    compiled graphs, with the steps' mode (the scripts' ``utils.chunk_compile_options``)."""
    chunks = None
    if compile and not cudagraphs:
        chunks = {} if compile_mode is None else {"mode": compile_mode}
    loss = make_loss(N=N, device=device, step_sampling=step_sampling, ensemble_chunk_compile=chunks)
    loss = networks.set_fuse_narrow_linear(loss, fuse_narrow)
    fused = None if adam == "foreach" else True  # fused, as the scripts do; foreach: CUDA's default
    optimizers = {g: torch.optim.Adam(p, lr=3e-4, fused=fused) for g, p in BDPOUpdate.param_groups(loss).items()}
    updaters = dict(zip(("critic", "actor", "behavior"), loss.make_target_updaters(tau=0.005)))
    return BDPOUpdate(
        loss, optimizers, updaters, grad_clip=1.0, compile=compile, compile_mode=compile_mode, cudagraphs=cudagraphs, overlap_losses=overlap_losses
    )


def bare_mlp_step(device, batch_size, compile=False, hidden=256, depth=4, time_dim=64):
    """One Adam step of a bare ``nn.Sequential`` with the behavior network's layer sizes.

    ``[a^n, time embedding, s] -> depth x hidden (Linear + Mish) -> action``, fused Adam,
    squared error to a fixed random target (``compile``: the network ``torch.compile``d): what
    this machine gives those GEMM shapes in a training step, without our losses, time MLP,
    gradient clip or target EMA.
    """
    net = mlp(ACT + time_dim + OBS, hidden, depth, ACT).to(device)
    forward = torch.compile(net) if compile else net
    opt = torch.optim.Adam(net.parameters(), lr=3e-4, fused=True)
    x = torch.randn(batch_size, ACT + time_dim + OBS, device=device)
    y = torch.randn(batch_size, ACT, device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        (forward(x) - y).pow(2).mean().backward()
        opt.step()

    return step


def time_steps(update, batch, steps: int, device) -> dict:
    """One timing of each step of ``update``: critic and policy over ``steps`` calls, behavior
    over ``10 x steps``; phase B is a critic step every step, an actor + behavior step every 5th."""
    t_c = timed(lambda: update.critic(batch), steps, device)
    t_p = timed(lambda: update.policy(batch), steps, device)
    t_b = timed(lambda: update.behavior(batch), steps * 10, device)
    return {"critic_step_s": t_c, "actor_behavior_step_s": t_p, "phase_b_steps_per_s": 1 / (t_c + t_p / 5), "pretrain_steps_per_s": 1 / t_b}


def median_round(rounds: list[dict]) -> dict:
    """Per-key median over rounds (``rounds`` kept alongside)."""
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def bench_update(args, device, progress=None):
    """Phase-B steps/s of full optimizer steps (critics every step, actor + behavior every 5th, amortised)
    and phase-A (behavior pretraining) steps/s.

    Every variant is built (compiled, captured) first; then ``--repeats`` rounds time each
    variant in turn, so a machine that speeds up or slows down during the run (a shared VM)
    weighs on every variant alike. Reported: the per-round median, and every round.

    ``progress`` (optional) is called with what is measured so far (``"partial": True``, the
    variants' build times and errors, the rounds) after each build and each round, so that a run
    stopped by a time limit keeps them.
    """
    batch = make_batch(args.batch_size, device, terminal=args.terminal)
    out = {}
    built = {}

    def report(rounds: dict) -> None:
        if progress is not None:
            progress({**out, "partial": True, "setup_s": {name: b[2] for name, b in built.items()}, "rounds": {name: r for name, r in rounds.items() if r}})

    for name, (compile, cudagraphs, overlap, sampling, fuse_narrow) in update_variants(args, device).items():
        torch.manual_seed(0)
        t0 = time.perf_counter()
        try:
            update = make_update(
                device,
                compile,
                cudagraphs,
                N=args.N,
                adam=args.adam,
                overlap_losses=overlap,
                step_sampling=sampling,
                fuse_narrow=False if fuse_narrow is None else fuse_narrow,
            )
            for _ in range(3):  # first (eager) call, compilation, warm-up and capture
                update.critic(batch), update.policy(batch), update.behavior(batch)
            sync(device)
        except Exception as err:  # noqa: BLE001  a variant that cannot be built is reported, the others still run
            if name == "eager":
                raise
            traceback.print_exc()
            out[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
            print(name, "failed to build:", out[name]["error"][:300], flush=True)
            report({})
            continue
        steps = args.steps * (args.graph_factor if cudagraphs else 1)
        built[name] = (update, steps, time.perf_counter() - t0)
        print(name, f"built in {built[name][2]:.1f} s", flush=True)
        if "gflop_per_phase_b_step" not in out:  # counted on the eager update
            with FlopCounterMode(display=False) as fc:
                update.critic(batch)
            critic_flops = fc.get_total_flops()
            with FlopCounterMode(display=False) as fc:
                update.policy(batch)
            out["gflop_per_phase_b_step"] = (critic_flops + fc.get_total_flops() / 5) / 1e9
        report({})
    flops = out["gflop_per_phase_b_step"] * 1e9
    bare = {"eager": bare_mlp_step(device, args.batch_size)}
    if not args.no_compile and device.type == "cpu":  # the CPU pretraining target's reference
        bare["compiled"] = bare_mlp_step(device, args.batch_size, compile=True)
    rounds = {name: [] for name in built}
    bare_rounds, peak_rounds = {k: [] for k in bare}, []
    for r in range(args.repeats):
        peak_rounds.append(matmul_peak(device, reps=10))
        for name, (update, steps, _) in built.items():
            res = time_steps(update, batch, steps, device)
            res["gflops_per_s"] = flops * res["phase_b_steps_per_s"] / 1e9
            rounds[name].append(res)
        for k, step in bare.items():
            bare_rounds[k].append(1 / timed(step, args.steps * 10, device))
        print(f"round {r + 1}/{args.repeats}", json.dumps({k: round(v[-1]["phase_b_steps_per_s"], 3) for k, v in rounds.items()}), flush=True)
        report(rounds)
    out["bare_mlp_steps_per_s"] = {k: statistics.median(v) for k, v in bare_rounds.items()}
    out["bare_mlp_rounds"] = bare_rounds
    out["matmul_peak_gflops_rounds"] = peak_rounds
    for name, (update, steps, setup_s) in built.items():
        res = median_round(rounds[name])
        res["fraction_of_matmul_peak"] = statistics.median(r["gflops_per_s"] / p for r, p in zip(rounds[name], peak_rounds))
        bare_ref = bare_rounds["compiled" if name.startswith("compiled") and "compiled" in bare_rounds else "eager"]
        res["pretrain_over_bare_mlp"] = statistics.median(  # compiled variants against the compiled bare MLP (CPU)
            r["pretrain_steps_per_s"] / b for r, b in zip(rounds[name], bare_ref)
        )
        if name != "eager":  # ratio per round (same minutes), then the median
            res["speedup_over_eager"] = statistics.median(r["phase_b_steps_per_s"] / e["phase_b_steps_per_s"] for r, e in zip(rounds[name], rounds["eager"]))
        for suffix, key in (("_overlap", "speedup_over_one_stream"), ("_stratified", "speedup_over_uniform_steps")):
            base = name.removesuffix(suffix)  # the same step with one change, timed in the same rounds
            if base != name and base in rounds:
                res[key] = statistics.median(r["phase_b_steps_per_s"] / o["phase_b_steps_per_s"] for r, o in zip(rounds[name], rounds[base]))
        base = name.removesuffix("_sums")
        if base != name and base in rounds:  # this variant (narrow maps as sums) over the library's default (GEMMs)
            res["speedup_over_gemms"] = statistics.median(r["phase_b_steps_per_s"] / o["phase_b_steps_per_s"] for r, o in zip(rounds[name], rounds[base]))
        res.update(setup_s=setup_s, timed_steps=steps, rounds=rounds[name])
        out[name] = res
        print(name, json.dumps({k: v for k, v in res.items() if k != "rounds"}), flush=True)
    return out


def bench_acting(args, device):
    """Acting latency at batch 1 and throughput at batch 256 (N=5, target actor, ensemble-mean Q),
    variants timed in turn over ``--repeats`` rounds; the median round is reported."""
    loss = make_loss(N=args.N, device=device)
    built = {}
    inputs = {B: TensorDict({"observation": torch.randn(B, OBS, device=device)}, [B]) for B in (1, 256)}
    for name, (compile, cudagraphs) in variants(args, device).items():
        acting = loss.make_acting_module(num_candidates=10, compile=compile, cudagraphs=cudagraphs, validate=False)
        for td in inputs.values():
            for _ in range(3):
                acting(td)
        built[name] = (acting, cudagraphs)
    rounds = {name: [] for name in built}
    for _ in range(args.repeats):
        for name, (acting, cudagraphs) in built.items():
            steps = max(args.steps, 20) * (args.graph_factor if cudagraphs else 1)
            res = {}
            for B, td in inputs.items():
                sec = timed(lambda: acting(td), steps, device)
                res[f"batch_{B}_latency_ms"] = sec * 1e3
                res[f"batch_{B}_actions_per_s"] = B / sec
            rounds[name].append(res)
    out = {}
    for name in built:
        med = median_round(rounds[name])
        out[name] = {f"batch_{B}": {"latency_ms": med[f"batch_{B}_latency_ms"], "actions_per_s": med[f"batch_{B}_actions_per_s"]} for B in inputs}
        out[name]["rounds"] = rounds[name]
        print("acting", name, json.dumps({k: v for k, v in out[name].items() if k != "rounds"}), flush=True)
    return out


def bench_actor_cost(args, device):
    """BDPO's one-step actor update vs a Diffusion-QL-style update through the whole chain, same networks.

    Eager; N = 5, 20, 50 timed in turn over ``--repeats`` rounds (medians reported)."""
    fns = {}
    for N in (5, 20, 50):
        loss = make_loss(N=N, device=device)
        batch = make_batch(args.batch_size, device, terminal=args.terminal)

        def bdpo(loss=loss, batch=batch):
            loss.actor_loss(batch)[0].backward()

        def full_chain(loss=loss, batch=batch):
            actor, q_op = loss.actor_network, loss.qvalue_network
            with loss.actor_network_params.to_module(actor):
                a0 = actor.sample_path(batch["observation"]).action  # gradient through all N steps
            with loss.target_qvalue_network_params[0].to_module(q_op):
                q = q_op.module(batch["observation"], a0)
            (-q.mean()).backward()

        fns[f"N={N}"] = (bdpo, full_chain)
    rounds = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, (bdpo, full_chain) in fns.items():
            rounds[k].append({"bdpo_actor_s": timed(bdpo, args.steps, device), "full_chain_actor_s": timed(full_chain, args.steps, device)})
    out = {k: {**median_round(v), "rounds": v} for k, v in rounds.items()}
    base = out["N=5"]
    for v in out.values():
        v["bdpo_over_bdpo_N5"] = v["bdpo_actor_s"] / base["bdpo_actor_s"]
        v["full_chain_over_full_chain_N5"] = v["full_chain_actor_s"] / base["full_chain_actor_s"]
    print("actor_cost", json.dumps({k: {m: round(x, 4) for m, x in v.items() if m != "rounds"} for k, v in out.items()}), flush=True)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/latest.json"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="rounds in which every variant is timed in turn (median reported)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="d4rl", help="d4rl: N=5, batch 256; toy: N=50, batch 512")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", choices=("update", "acting", "actor_cost"), action="append")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-overlap", action="store_true", help="GPU: leave out the update variants with the losses on two CUDA streams (overlap_losses)")
    p.add_argument(
        "--matmul-precision",
        default="highest",
        choices=("highest", "high", "medium"),
        help="torch.set_float32_matmul_precision: 'high' allows TF32 on GPUs (JAX's GPU default)",
    )
    p.add_argument(
        "--no-narrow-ab",
        action="store_true",
        help="GPU: leave out the fastest compiled variant again with the networks' narrow maps as fused sums (<name>_sums)",
    )
    p.add_argument("--adam", choices=("fused", "foreach"), default="fused", help="Adam implementation (the scripts use fused)")
    p.add_argument(
        "--step-sampling",
        choices=("uniform", "stratified", "both"),
        default="uniform",
        help="the loss's step_sampling for the update variants; both: uniform, and the fastest variant again with stratified steps (<name>_stratified)",
    )
    p.add_argument("--graph-factor", type=int, default=20, help="timed steps x this for CUDA-graph variants")
    p.add_argument(
        "--terminal",
        choices=("preset", "all", "none"),
        default="preset",
        help="next states of the batch: terminal for all or none of the rows (preset: toy all, d4rl none)",
    )
    return p


def write_result(path: Path, result: dict) -> dict:
    """Write a benchmark's JSON (its folder made if needed) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"written to {path}")
    return result


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("steps", "repeats", "graph_factor"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected an integer >= 1.")
    global OBS, ACT
    preset = PRESETS[args.preset]
    OBS, ACT, args.N = preset["obs_dim"], preset["act_dim"], preset["N"]
    args.batch_size = args.batch_size or preset["batch"]
    args.terminal = preset["terminal"] if args.terminal == "preset" else args.terminal == "all"
    device = torch.device(args.device)
    torch.set_float32_matmul_precision(args.matmul_precision)
    torch.manual_seed(0)
    parts = args.only or ["acting", "update", "actor_cost"]
    result = {
        "date": str(date.today()),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "settings": {
            "preset": args.preset,
            "N": args.N,
            "K": 10,
            "M": 10,
            "batch": args.batch_size,
            "hidden": 256,
            "obs_dim": OBS,
            "act_dim": ACT,
            "steps": args.steps,
            "repeats": args.repeats,
            "matmul_precision": args.matmul_precision,
            "adam": args.adam,
            "terminal_next_states": args.terminal,
            "step_sampling": args.step_sampling,
        },
        "matmul_peak_gflops": matmul_peak(device),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(part, measured):
        result[part] = measured
        args.out.write_text(json.dumps(result, indent=2))

    # the JSON is rewritten after each part, and during the update part after each build and round:
    # a run cut short (a device's time limit) keeps what it measured, marked "partial": true
    for part in parts:
        if part == "update":
            measured = bench_update(args, device, progress=lambda partial: save("update", partial))
            measured["best_fraction_of_matmul_peak"] = max(v["fraction_of_matmul_peak"] for v in measured.values() if isinstance(v, dict) and "rounds" in v)
        else:
            measured = {"acting": bench_acting, "actor_cost": bench_actor_cost}[part](args, device)
        save(part, measured)
    print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()
