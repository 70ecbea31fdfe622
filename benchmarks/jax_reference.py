"""Pretraining steps/s against an XLA-compiled JAX step of the same math, timed in the same run.

    pip install jax optax      # CPU jaxlib; only this benchmark uses them
    python benchmarks/jax_reference.py --preset toy --out benchmarks/results/jax_reference_toy.json
    python benchmarks/jax_reference.py --preset d4rl --out benchmarks/results/jax_reference_d4rl.json

The speed issue's reference figures (75 toy and 86 D4RL pretraining steps/s) are the authors'
JAX code on "this kind of 2-core CPU", but the hosts behind this VM differ by ~2x in speed and
drift within minutes, so a rate measured here cannot be held against a figure measured elsewhere.
This script measures the reference's kind of program on the same host, in the same minutes: the
behavior (pretraining) step written in JAX (``n ~ U{1..N}``, forward noising, the
eps-network of DESIGN.md section 3, mean squared eps error, gradient clip at global norm 1.0,
Adam 3e-4, target EMA 0.005), ``jax.jit``-compiled as one XLA program with donated buffers.
It is written here from DESIGN.md, not taken from the authors' code (which this workplace cannot
reach); ``tests/test_jax_reference.py`` checks that it computes what our step computes (loss,
gradients, one optimizer step, from the same parameters and draws).

Four variants take turns over ``--rounds`` rounds (order rotated each round): ``ours``
(``BDPOUpdate.behavior``, compiled, as ``bench_bdpo.py`` builds it: one functional program for
loss, gradients and clip), ``ours_regular_step`` (the same update without that program: the
compiled loss method, autograd's backward, ``clip_grad_norm_``), ``bare_mlp`` (a compiled
``nn.Sequential`` of the same layer sizes with fused Adam, no clip or EMA: ``bench_bdpo.bare_mlp_step``)
and ``jax_xla``. Torch and JAX run in two worker processes, each built once, which wait on a
pipe while the other is timed (neither spins a thread pool during the other's turn). Each ratio
is taken within a round, then the median. Random batches, as the issue's figures were.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# the speed issue's figures for the authors' JAX code on a 2-core CPU, pretraining steps/s
AUTHORS_PRETRAIN = {"toy": 75.0, "d4rl": 86.0}
# the presets of bench_bdpo.PRESETS (repeated so that the JAX worker needs no torch)
PRESETS = {
    "d4rl": {"N": 5, "obs_dim": 17, "act_dim": 6, "batch": 256},
    "toy": {"N": 50, "obs_dim": 1, "act_dim": 2, "batch": 512},
}
HIDDEN, DEPTH, TIME_DIM, LR, CLIP, TAU = 256, 4, 64, 3e-4, 1.0, 0.005
PREFIX = "@@ "  # protocol lines on a worker's stdout; anything else there is passed through


# ----------------------------------------------------------------------------- the JAX step
def vp_alphas_cumprod(N: int, b_min: float = 0.1, b_max: float = 10.0) -> np.ndarray:
    """``[abar_0 = 1, abar_1, ..., abar_N]`` of the "vp" schedule (DESIGN.md section 2)."""
    n = np.arange(1, N + 1, dtype=np.float64)
    alphas = np.exp(-b_min / N - 0.5 * (b_max - b_min) * (2 * n - 1) / N**2)
    return np.concatenate([[1.0], np.cumprod(alphas)]).astype(np.float32)


def _jax():
    import jax
    import jax.numpy as jnp
    import optax

    return jax, jnp, optax


def init_params(key, obs_dim: int, act_dim: int, hidden: int = HIDDEN, depth: int = DEPTH, time_dim: int = TIME_DIM):
    """The eps-network's parameters: ``{"time": [(W, b), (W, b)], "body": [(W, b)] * (depth + 1)}``,
    ``W`` of shape ``[in, out]``, orthogonal (gain sqrt 2) with zero biases, as ours."""
    jax, jnp, _ = _jax()
    ortho = jax.nn.initializers.orthogonal(math.sqrt(2.0))
    sizes_time = [(time_dim, time_dim), (time_dim, time_dim)]
    sizes_body = [(act_dim + time_dim + obs_dim, hidden)] + [(hidden, hidden)] * (depth - 1) + [(hidden, act_dim)]
    keys = jax.random.split(key, len(sizes_time) + len(sizes_body))
    layer = lambda k, s: (ortho(k, s, jnp.float32), jnp.zeros((s[1],), jnp.float32))  # noqa: E731
    return {
        "time": [layer(k, s) for k, s in zip(keys[:2], sizes_time)],
        "body": [layer(k, s) for k, s in zip(keys[2:], sizes_body)],
    }


def params_from_torch(net) -> dict:
    """:func:`init_params`' layout filled from a torch ``EpsilonNetwork`` (for the equivalence test)."""
    _, jnp, _ = _jax()

    def linear(m):
        return (jnp.asarray(m.weight.detach().cpu().numpy().T), jnp.asarray(m.bias.detach().cpu().numpy()))

    time_linears = [m for m in net.time_mlp if hasattr(m, "weight")]
    body_linears = [m for m in net.body if hasattr(m, "weight")]
    return {"time": [linear(m) for m in time_linears], "body": [linear(m) for m in body_linears]}


def eps_net(params, action, step, observation):
    """``eps(a^n, n, s)``: ``concat[a^n, time_mlp(sinusoidal(n)), s] -> Mish MLP -> action_dim``."""
    jax, jnp, _ = _jax()

    def mish(x):
        return x * jnp.tanh(jax.nn.softplus(x))

    half = TIME_DIM // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    arg = step.astype(jnp.float32)[:, None] * freqs
    t = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], -1)
    for w, b in params["time"]:
        t = mish(t @ w + b)
    h = jnp.concatenate([action, t, observation], -1)
    *hidden, (w_out, b_out) = params["body"]
    for w, b in hidden:
        h = mish(h @ w + b)
    return h @ w_out + b_out


def denoising_loss(params, observation, action, step, noise, alphas_cumprod):
    """Mean squared eps error at ``a^n = sqrt(abar_n) a + sqrt(1 - abar_n) eps`` (given ``n``, ``eps``)."""
    _, jnp, _ = _jax()
    abar = alphas_cumprod[step][:, None]
    noisy = jnp.sqrt(abar) * action + jnp.sqrt(1.0 - abar) * noise
    return jnp.mean((eps_net(params, noisy, step, observation) - noise) ** 2)


def make_optimizer():
    """Gradient clip at global norm 1.0, then Adam 3e-4 (optax's defaults otherwise, as torch's)."""
    _, _, optax = _jax()
    return optax.chain(optax.clip_by_global_norm(CLIP), optax.adam(LR))


def update(params, opt_state, target, observation, action, step, noise, alphas_cumprod, optimizer):
    """One behavior step with given draws: ``(params, opt_state, target, loss)``."""
    jax, _, optax = _jax()
    loss, grads = jax.value_and_grad(denoising_loss)(params, observation, action, step, noise, alphas_cumprod)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    target = optax.incremental_update(params, target, TAU)
    return params, opt_state, target, loss


def make_jax_step(preset: str, seed: int = 0):
    """The timed program: one jitted step that draws ``n`` and ``eps`` itself; returns a
    zero-argument callable (one step) and a ``block`` that waits for the last one."""
    jax, jnp, _ = _jax()
    cfg = PRESETS[preset]
    N, B, O, A = cfg["N"], cfg["batch"], cfg["obs_dim"], cfg["act_dim"]
    abar = jnp.asarray(vp_alphas_cumprod(N))
    optimizer = make_optimizer()
    key = jax.random.PRNGKey(seed)
    key, k_init, k_obs, k_act = jax.random.split(key, 4)
    params = init_params(k_init, O, A)
    target = jax.tree_util.tree_map(jnp.copy, params)
    opt_state = optimizer.init(params)
    observation = jax.random.normal(k_obs, (B, O), jnp.float32)
    action = jax.random.uniform(k_act, (B, A), jnp.float32, -1.0, 1.0)

    def step_fn(params, opt_state, target, key, observation, action):
        key, k_step, k_noise = jax.random.split(key, 3)
        step = jax.random.randint(k_step, (observation.shape[0],), 1, N + 1)
        noise = jax.random.normal(k_noise, action.shape, jnp.float32)
        params, opt_state, target, loss = update(
            params, opt_state, target, observation, action, step, noise, abar, optimizer
        )
        return params, opt_state, target, key, loss

    jitted = jax.jit(step_fn, donate_argnums=(0, 1, 2, 3))
    state = {"carry": (params, opt_state, target, key), "loss": None}

    def one():
        *carry, state["loss"] = jitted(*state["carry"], observation, action)
        state["carry"] = tuple(carry)

    def block():
        jax.block_until_ready((state["carry"], state["loss"]))

    return one, block


# ------------------------------------------------------------------------------ workers
def _torch_variants(preset: str) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    import bench_bdpo as bench

    cfg = bench.PRESETS[preset]
    bench.OBS, bench.ACT = cfg["obs_dim"], cfg["act_dim"]
    torch.manual_seed(0)
    device = torch.device("cpu")
    update = bench.make_update(device, compile=True, N=cfg["N"])
    regular = bench.make_update(device, compile=True, N=cfg["N"])
    regular._behavior_program = None  # the compiled loss method, autograd's backward, clip_grad_norm_
    batch = bench.make_batch(cfg["batch"], device, terminal=cfg["terminal"])
    bare = bench.bare_mlp_step(device, cfg["batch"], compile=True)
    done = lambda: None  # noqa: E731  (torch's CPU steps return when done)
    return {
        "ours": (lambda: update.behavior(batch), done),
        "ours_regular_step": (lambda: regular.behavior(batch), done),
        "bare_mlp": (bare, done),
    }


def _jax_variants(preset: str) -> dict:
    return {"jax_xla": make_jax_step(preset)}


WORKERS = {"torch": _torch_variants, "jax": _jax_variants}


def _say(obj) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker(kind: str, preset: str) -> None:
    """Build this worker's variants (compile, warm up), then answer ``{"time": name, "steps": S}``
    lines on stdin with ``{"seconds_per_step": ...}`` until stdin closes."""
    t0 = time.perf_counter()
    variants = WORKERS[kind](preset)
    for step, block in variants.values():
        for _ in range(3):  # compilation and warm-up
            step()
        block()
    _say({"ready": sorted(variants), "setup_s": time.perf_counter() - t0, "versions": _versions()})
    for line in sys.stdin:
        request = json.loads(line)
        step, block = variants[request["time"]]
        for _ in range(2):
            step()
        block()
        t = time.perf_counter()
        for _ in range(request["steps"]):
            step()
        block()
        _say({"seconds_per_step": (time.perf_counter() - t) / request["steps"]})


class Worker:
    """A worker process driven over its stdin / stdout."""

    def __init__(self, kind: str, preset: str) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--preset", preset]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.kind = kind
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.hello = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
            sys.stdout.write(line)
        code = self.proc.wait()
        raise RuntimeError(f"the {self.kind} worker exited with code {code} before answering (see its output above).")

    def time(self, name: str, steps: int) -> float:
        self.proc.stdin.write(json.dumps({"time": name, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        return self._read()["seconds_per_step"]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args) -> dict:
    kinds = args.workers
    workers = {}
    try:
        for kind in kinds:
            workers[kind] = Worker(kind, args.preset)
            print(kind, "worker ready:", workers[kind].hello, flush=True)
        owner = {name: w for w in workers.values() for name in w.hello["ready"]}
        names = list(owner)
        rounds = []
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]  # rotated: no variant always first
            res = {name: 1.0 / owner[name].time(name, args.steps) for name in order}
            rounds.append(res)
            print(f"round {r + 1}/{args.rounds} steps/s", json.dumps({k: round(v, 1) for k, v in res.items()}), flush=True)
    finally:
        for w in workers.values():
            w.close()
    out = {
        "date": str(date.today()),
        "device": f"cpu: {cpu_name()} ({os.cpu_count()} logical cores)",
        "command": "python benchmarks/jax_reference.py " + " ".join(sys.argv[1:]),
        "settings": {"preset": args.preset, **PRESETS[args.preset], "hidden": HIDDEN, "depth": DEPTH,
                     "steps_per_timing": args.steps, "rounds": args.rounds},
        "versions": {k: w.hello.get("versions") for k, w in workers.items()},
        "setup_s": {k: w.hello["setup_s"] for k, w in workers.items()},
        "steps_per_s": {name: statistics.median(r[name] for r in rounds) for name in names},
        "rounds_steps_per_s": rounds,
    }
    if "jax_xla" in names:
        out["over_jax_xla"] = {
            name: statistics.median(r[name] / r["jax_xla"] for r in rounds) for name in names if name != "jax_xla"
        }
        reference = AUTHORS_PRETRAIN[args.preset]
        out["authors_figure_steps_per_s"] = reference
        # how this host compares with the one behind the figure, if ours is like theirs
        out["jax_xla_over_authors_figure"] = out["steps_per_s"]["jax_xla"] / reference
    return out


def _versions() -> dict:
    found = {}
    for mod in ("torch", "jax", "jaxlib", "optax"):
        if mod in sys.modules:
            found[mod] = getattr(sys.modules[mod], "__version__", "?")
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), default="toy")
    p.add_argument("--steps", type=int, default=100, help="steps per timing")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="JSON out (default: benchmarks/results/jax_reference_<preset>.json)")
    p.add_argument(
        "--workers", nargs="+", choices=tuple(WORKERS), default=list(WORKERS),
        help="which processes to run (default: both; `--workers torch` runs without JAX)",
    )
    p.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)}: expected an integer >= 1.")
    if args.worker:
        return worker(args.worker, args.preset)
    if "jax" in args.workers:
        try:
            _jax()
        except ImportError as err:
            p.error(f"JAX is not installed ({err}): `pip install jax optax` (CPU), or pass --workers torch.")
    out_path = args.out or HERE / "results" / f"jax_reference_{args.preset}.json"
    result = run(args)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("steps_per_s", "over_jax_xla", "jax_xla_over_authors_figure") if k in result}))
    print(f"written to {out_path}")
    return result


if __name__ == "__main__":
    main()
