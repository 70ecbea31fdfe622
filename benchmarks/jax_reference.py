"""BDPO steps/s against XLA-compiled JAX steps of the same math, timed in the same run.

    pip install jax optax      # CPU jaxlib; only this benchmark uses them
    python benchmarks/jax_reference.py --preset toy          # pretraining (the behavior step)
    python benchmarks/jax_reference.py --preset d4rl
    python benchmarks/jax_reference.py --phase phase_b --preset d4rl --rounds 3   # phase B

The speed issue's reference figures (75 toy and 86 D4RL pretraining steps/s) are the authors'
JAX code on "this kind of 2-core CPU", but the hosts behind this VM differ by ~2x in speed and
drift within minutes, so a rate measured here cannot be held against a figure measured elsewhere.
This script measures the reference's kind of program on the same host, in the same minutes: the
behavior (pretraining) step written in JAX (``n ~ U{1..N}``, forward noising, the
eps-network of docs/design.md section 3, mean squared eps error, gradient clip at global norm 1.0,
Adam 3e-4, target EMA 0.005), ``jax.jit``-compiled as one XLA program with donated buffers.
It is written here from docs/design.md, not taken from the authors' code (which this workplace cannot
reach); ``tests/test_jax_reference.py`` checks that it computes what our step computes (the
network, and the loss and parameters over three clipped optimizer steps, from the same
parameters and draws).

``--phase phase_b`` times phase B instead: our compiled ``BDPOUpdate.critic`` and ``.policy``
(as ``bench_bdpo.py`` builds them) against two jitted JAX steps written the same way from
docs/design.md section 4: the critic step (the target actor's ``M x N`` reverse chains at ``s'``, the
behavior EMA's path KL over all their steps in one pass, the Q ensemble at ``a'^0`` through
``vmap``, the V target's one reverse step with ``V_{n-1}`` / ``Q`` at ``n - 1 = 0`` selected by
``where``, both TD losses, clip, Adam, EMA) and the policy step (the one-step actor loss and the
behavior's denoising step). Static shapes throughout, as a jitted program has them: every chain is
run, terminal next states included (ours skips those: one of the issue's levers). Phase-B steps/s
is ``1 / (t_critic + t_policy / 5)`` for both. ``tests/test_jax_reference.py`` checks the Q target
and the one-step objective against our loss's, from the same parameters and draws.

In the pretraining mode, four variants take turns over ``--rounds`` rounds (order rotated each round): ``ours``
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
# the speed issue's figures for the authors' JAX code on a 2-core CPU: pretraining and phase-B steps/s
AUTHORS_PRETRAIN = {"toy": 75.0, "d4rl": 86.0}
AUTHORS_PHASE_B = {"toy": 0.2, "d4rl": 0.9}
# the presets of bench_bdpo.PRESETS (repeated so that the JAX worker needs no torch)
PRESETS = {
    "d4rl": {"N": 5, "obs_dim": 17, "act_dim": 6, "batch": 256, "terminal": False},
    "toy": {"N": 50, "obs_dim": 1, "act_dim": 2, "batch": 512, "terminal": True},
}
HIDDEN, DEPTH, TIME_DIM, LR, CLIP, TAU = 256, 4, 64, 3e-4, 1.0, 0.005
PREFIX = "@@ "  # protocol lines on a worker's stdout; anything else there is passed through


# ----------------------------------------------------------------------------- the JAX step
def vp_tables(N: int, b_min: float = 0.1, b_max: float = 10.0) -> dict:
    """The "vp" schedule's per-step tables (index ``n = 0..N``), as ``NoiseSchedule`` holds them
    (``sigma_n^2 = beta_n``, no noise at ``n = 1``)."""
    n = np.arange(1, N + 1, dtype=np.float64)
    alphas = np.concatenate([[1.0], np.exp(-b_min / N - 0.5 * (b_max - b_min) * (2 * n - 1) / N**2)])
    betas = 1.0 - alphas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    tables = {
        "abar": abar,
        "coef_x0": np.concatenate([[0.0], np.sqrt(abar_prev[1:]) * betas[1:] / (1 - abar[1:])]),
        "coef_xt": np.concatenate([[0.0], np.sqrt(alphas[1:]) * (1 - abar_prev[1:]) / (1 - abar[1:])]),
        "kl_w": np.concatenate([[0.0], betas[1:] / (2 * alphas[1:] * (1 - abar[1:]))]),
        "scales": np.concatenate([[0.0, 0.0], np.sqrt(betas[2:])]),
    }
    return {k: v.astype(np.float32) for k, v in tables.items()}


def vp_alphas_cumprod(N: int) -> np.ndarray:
    """``[abar_0 = 1, abar_1, ..., abar_N]`` of the "vp" schedule (docs/design.md section 2)."""
    return vp_tables(N)["abar"]


def _jax():
    import jax
    import jax.numpy as jnp
    import optax

    return jax, jnp, optax


def init_mlp(key, sizes, layer_norm=False):
    """``[(W [in, out], b[, ln_w, ln_b])]``, orthogonal (gain sqrt 2), zero biases, LayerNorm at 1 / 0."""
    jax, jnp, _ = _jax()
    ortho = jax.nn.initializers.orthogonal(math.sqrt(2.0))
    out = []
    for i, (k, (a, b)) in enumerate(zip(jax.random.split(key, len(sizes)), sizes)):
        layer = (ortho(k, (a, b), jnp.float32), jnp.zeros((b,), jnp.float32))
        if layer_norm and i < len(sizes) - 1:
            layer += (jnp.ones((b,), jnp.float32), jnp.zeros((b,), jnp.float32))
        out.append(layer)
    return out


def _mish(x):
    jax, jnp, _ = _jax()
    return x * jnp.tanh(jax.nn.softplus(x))


def apply_mlp(layers, h):
    """Hidden layers ``Linear (LayerNorm) Mish``, then a linear head (LayerNorm eps 1e-5, torch's)."""
    _, jnp, _ = _jax()
    *hidden, (w_out, b_out) = layers
    for layer in hidden:
        h = h @ layer[0] + layer[1]
        if len(layer) == 4:
            mu = h.mean(-1, keepdims=True)
            var = ((h - mu) ** 2).mean(-1, keepdims=True)
            h = (h - mu) / jnp.sqrt(var + 1e-5) * layer[2] + layer[3]
        h = _mish(h)
    return h @ w_out + b_out


def _sinusoidal(step, dim=TIME_DIM):
    _, jnp, _ = _jax()
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    arg = step.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], -1)


def _time_branch(layers, step):
    """The sinusoidal embedding of the raw step, then ``Linear-Mish`` per layer (eps and V networks)."""
    t = _sinusoidal(step)
    for w, b in layers:
        t = _mish(t @ w + b)
    return t


def init_params(key, obs_dim: int, act_dim: int, hidden: int = HIDDEN, depth: int = DEPTH, time_dim: int = TIME_DIM):
    """The eps-network's parameters: ``{"time": [(W, b), (W, b)], "body": [(W, b)] * (depth + 1)}``,
    ``W`` of shape ``[in, out]``, orthogonal (gain sqrt 2) with zero biases, as ours."""
    jax, _, _ = _jax()
    k_time, k_body = jax.random.split(key)
    sizes_body = [(act_dim + time_dim + obs_dim, hidden)] + [(hidden, hidden)] * (depth - 1) + [(hidden, act_dim)]
    return {"time": init_mlp(k_time, [(time_dim, time_dim), (time_dim, time_dim)]), "body": init_mlp(k_body, sizes_body)}


def params_from_torch(net) -> dict:
    """:func:`init_params`' layout filled from a torch ``EpsilonNetwork`` (for the equivalence test)."""
    return params_from_leaves({tuple(k.split(".")): v for k, v in net.state_dict().items()})


def params_from_leaves(leaves: dict) -> dict:
    """Our parameters (``{path tuple: tensor}``: a module's ``state_dict``, or a loss's
    ``*_network_params`` TensorDict items, stacked ``[K, ...]`` for an ensemble) in this file's
    layout: ``{"time": [...], "body": [...]}``, each layer ``(W [in, out], b[, ln_w, ln_b])``,
    LayerNorms (1-D weights) joined to the Linear before them."""
    _, jnp, _ = _jax()
    groups = {}
    for key, value in leaves.items():
        *path, index, kind = key
        if kind not in ("weight", "bias"):
            continue  # buffers (the sinusoid's frequencies)
        groups.setdefault(path[-1], {}).setdefault(int(index), {})[kind] = value.detach().cpu().numpy()
    out = {}
    for part in ("time_mlp", "body"):
        layers = []
        for _, tensors in sorted(groups.get(part, {}).items()):
            w, b = tensors["weight"], tensors["bias"]
            if w.ndim == b.ndim + 1:  # a Linear: [..., out, in]
                layers.append((jnp.asarray(np.swapaxes(w, -1, -2)), jnp.asarray(b)))
            else:  # a LayerNorm after the last Linear
                layers[-1] = layers[-1] + (jnp.asarray(w), jnp.asarray(b))
        if layers:
            out["time" if part == "time_mlp" else "body"] = layers
    return out


def eps_net(params, action, step, observation):
    """``eps(a^n, n, s)``: ``concat[a^n, time_mlp(sinusoidal(n)), s] -> Mish MLP -> action_dim``."""
    _, jnp, _ = _jax()
    t = _time_branch(params["time"], step)
    return apply_mlp(params["body"], jnp.concatenate([action, t, observation], -1))


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


def behavior_step(params, opt_state, target, key, observation, action, alphas_cumprod, optimizer):
    """:func:`update` with its own draws from ``key``: ``n ~ U{1..N}`` per row, then ``eps``."""
    jax, jnp, _ = _jax()
    k_step, k_noise = jax.random.split(key)
    step = jax.random.randint(k_step, (observation.shape[0],), 1, alphas_cumprod.shape[0])
    noise = jax.random.normal(k_noise, action.shape, jnp.float32)
    return update(params, opt_state, target, observation, action, step, noise, alphas_cumprod, optimizer)


def _timed_steps(jitted: dict, carry: tuple, *inputs) -> dict:
    """``{name: (one, block)}`` for jitted steps ``(*carry, *inputs) -> (*carry, loss)`` that share
    (and donate) one carried state: ``one`` runs a step, ``block`` waits for the last one."""
    jax, _, _ = _jax()
    state = {"carry": carry, "loss": None}

    def runner(fn):
        def one():
            *new, state["loss"] = fn(*state["carry"], *inputs)
            state["carry"] = tuple(new)

        return one

    def block():
        jax.block_until_ready((state["carry"], state["loss"]))

    return {name: (runner(fn), block) for name, fn in jitted.items()}


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
        key, sub = jax.random.split(key)
        params, opt_state, target, loss = behavior_step(params, opt_state, target, sub, observation, action, abar, optimizer)
        return params, opt_state, target, key, loss

    jitted = jax.jit(step_fn, donate_argnums=(0, 1, 2, 3))
    return _timed_steps({"jax_xla": jitted}, (params, opt_state, target, key), observation, action)["jax_xla"]


# ------------------------------------------------------------------ the JAX phase-B steps
# bench_bdpo.make_loss's settings: the target-side constants of a phase-B step
K, M, ETA, RHO, GAMMA, ACTOR_LR = 10, 10, 0.15, 1.0, 0.99, 1e-5
CRITIC_DEPTH = 3


def q_net(params, observation, action):
    _, jnp, _ = _jax()
    return apply_mlp(params["body"], jnp.concatenate([observation, action], -1))[..., 0]


def v_net(params, observation, action, step):
    """``V(s, a^n, n)``: time branch ``emb -> 128 -> 64`` (Mish), body ``[s, a, t]`` with LayerNorm."""
    _, jnp, _ = _jax()
    t = _time_branch(params["time"], step)
    return apply_mlp(params["body"], jnp.concatenate([observation, action, t], -1))[..., 0]


def init_phase_b(key, obs_dim: int, act_dim: int, hidden: int = HIDDEN) -> dict:
    """Online parameters of the four networks; ``q`` and ``v`` stacked over ``K`` members."""
    jax, _, _ = _jax()
    k_actor, k_beh, k_q, k_v = jax.random.split(key, 4)
    q_sizes = [(obs_dim + act_dim, hidden)] + [(hidden, hidden)] * (CRITIC_DEPTH - 1) + [(hidden, 1)]
    v_sizes = [(obs_dim + act_dim + TIME_DIM, hidden)] + [(hidden, hidden)] * (CRITIC_DEPTH - 1) + [(hidden, 1)]

    def q_member(k):
        return {"body": init_mlp(k, q_sizes)}

    def v_member(k):
        k1, k2 = jax.random.split(k)
        return {"time": init_mlp(k1, [(TIME_DIM, 2 * TIME_DIM), (2 * TIME_DIM, TIME_DIM)]), "body": init_mlp(k2, v_sizes, layer_norm=True)}

    return {
        "actor": init_params(k_actor, obs_dim, act_dim),
        "behavior": init_params(k_beh, obs_dim, act_dim),
        "q": jax.vmap(q_member)(jax.random.split(k_q, K)),
        "v": jax.vmap(v_member)(jax.random.split(k_v, K)),
    }


def _lcb(values):
    """``mean_k - rho std_k`` (population std) over the first axis."""
    return values.mean(0) - RHO * values.std(0)


def _reverse_mean(tables, action_n, step, eps):
    _, jnp, _ = _jax()
    col = lambda name: tables[name][step][..., None]  # noqa: E731
    x0 = jnp.clip((action_n - jnp.sqrt(1 - col("abar")) * eps) / jnp.sqrt(col("abar")), -1.0, 1.0)
    return col("coef_x0") * x0 + col("coef_xt") * action_n


def next_state_value(tgt, tables, next_obs, noise):
    """``LCB_k mean_M Q^tgt_k(s', a'^0) - eta mean_M sum_n l_n`` for every row (no terminal skip:
    static shapes, as a jitted program has); ``noise``: ``[N + 1, B, M, A]`` as ``sample_path``'s."""
    jax, jnp, _ = _jax()
    N = noise.shape[0] - 1
    B, A = next_obs.shape[0], noise.shape[-1]
    obs_m = jnp.broadcast_to(next_obs[:, None], (B, M, next_obs.shape[-1])).reshape(B * M, -1)
    action = noise[N].reshape(B * M, A)
    actions, eps_all = [], []
    for n in range(N, 0, -1):  # unrolled, as our chain
        step = jnp.full((B * M,), n)
        eps = eps_net(tgt["actor"], action, step, obs_m)
        actions.append(action)
        eps_all.append(eps)
        action = _reverse_mean(tables, action, step, eps) + tables["scales"][n] * noise[n - 1].reshape(B * M, A)
    steps = jnp.repeat(jnp.arange(N, 0, -1), B * M)
    eps_nu = eps_net(tgt["behavior"], jnp.concatenate(actions), steps, jnp.tile(obs_m, (N, 1)))
    kl = tables["kl_w"][steps] * ((jnp.concatenate(eps_all) - eps_nu) ** 2).sum(-1)
    path_kl = kl.reshape(N, B, M).sum(0).mean(-1)
    q = jax.vmap(q_net, in_axes=(0, None, None))(tgt["q"], obs_m, action).reshape(K, B, M).mean(-1)
    return _lcb(q) - ETA * path_kl


def one_step_objective(actor_params, tgt, tables, observation, action_n, step, z):
    """``(J, next_value, l_n)`` of one reparameterised reverse step from ``(s, a^n, n)``; ``z``: ``[B, M, A]``."""
    jax, jnp, _ = _jax()
    B, A = action_n.shape
    eps_pi = eps_net(actor_params, action_n, step, observation)
    mean = _reverse_mean(tables, action_n, step, eps_pi)
    prev = (mean[:, None] + tables["scales"][step][:, None, None] * z).reshape(B * M, A)
    obs_m = jnp.repeat(observation, M, axis=0)
    step_prev = jnp.repeat(step - 1, M)
    q = jax.vmap(q_net, in_axes=(0, None, None))(tgt["q"], obs_m, prev)
    v = jax.vmap(v_net, in_axes=(0, None, None, None))(tgt["v"], obs_m, prev, step_prev)
    next_value = _lcb(jnp.where(step_prev == 0, q, v).reshape(K, B, M).mean(-1))
    eps_nu = jax.lax.stop_gradient(eps_net(tgt["behavior"], action_n, step, observation))
    step_kl = tables["kl_w"][step] * ((eps_pi - eps_nu) ** 2).sum(-1)
    return next_value - ETA * step_kl, next_value, step_kl


def _noised(tables, key, action, N):
    jax, jnp, _ = _jax()
    k_step, k_eps = jax.random.split(key)
    step = jax.random.randint(k_step, action.shape[:1], 1, N + 1)
    eps = jax.random.normal(k_eps, action.shape, jnp.float32)
    abar = tables["abar"][step][:, None]
    return jnp.sqrt(abar) * action + jnp.sqrt(1 - abar) * eps, step


def make_jax_phase_b(preset: str, seed: int = 0):
    """The two jitted phase-B steps of the timed program, with their own draws:
    ``{"jax_critic": (step, block), "jax_policy": (step, block)}`` (policy: actor + behavior)."""
    jax, jnp, optax = _jax()
    cfg = PRESETS[preset]
    N, B, O, A = cfg["N"], cfg["batch"], cfg["obs_dim"], cfg["act_dim"]
    tables = {k: jnp.asarray(v) for k, v in vp_tables(N).items()}
    abar = jnp.asarray(vp_alphas_cumprod(N))
    key = jax.random.PRNGKey(seed)
    key, k_init, k_data = jax.random.split(key, 3)
    online = init_phase_b(k_init, O, A)
    target = jax.tree_util.tree_map(jnp.copy, online)
    # Q and V each with its own clip and Adam, as the authors' q0 and vt models (and BDPOUpdate)
    critic_tx = optax.chain(optax.clip_by_global_norm(CLIP), optax.adam(LR))
    actor_tx = optax.chain(optax.clip_by_global_norm(CLIP), optax.adam(ACTOR_LR))
    behavior_tx = make_optimizer()
    opt = {
        "critic": {net: critic_tx.init(online[net]) for net in ("q", "v")},
        "actor": actor_tx.init(online["actor"]),
        "behavior": behavior_tx.init(online["behavior"]),
    }
    ks = jax.random.split(k_data, 4)
    batch = {
        "obs": jax.random.normal(ks[0], (B, O), jnp.float32),
        "act": jax.random.uniform(ks[1], (B, A), jnp.float32, -1.0, 1.0),
        "next_obs": jax.random.normal(ks[2], (B, O), jnp.float32),
        "reward": jax.random.normal(ks[3], (B,), jnp.float32),
        "live": jnp.full((B,), 0.0 if cfg["terminal"] else 1.0, jnp.float32),
    }

    def critic_step(online, target, opt_state, key, batch):
        key, k_path, k_v, k_z = jax.random.split(key, 4)
        noise = jax.random.normal(k_path, (N + 1, B, M, A), jnp.float32)
        y_q = batch["reward"] + GAMMA * batch["live"] * next_state_value(target, tables, batch["next_obs"], noise)
        action_n, step = _noised(tables, k_v, batch["act"], N)
        z = jax.random.normal(k_z, (B, M, A), jnp.float32)
        y_v, _, _ = one_step_objective(target["actor"], target, tables, batch["obs"], action_n, step, z)

        def loss_fn(critics):
            q = jax.vmap(q_net, in_axes=(0, None, None))(critics["q"], batch["obs"], batch["act"])
            v = jax.vmap(v_net, in_axes=(0, None, None, None))(critics["v"], batch["obs"], action_n, step)
            return ((q - y_q) ** 2).mean() + ((v - y_v) ** 2).mean()

        critics = {"q": online["q"], "v": online["v"]}
        loss, grads = jax.value_and_grad(loss_fn)(critics)
        new_state = {}
        for net in ("q", "v"):
            updates, new_state[net] = critic_tx.update(grads[net], opt_state[net], critics[net])
            critics = {**critics, net: optax.apply_updates(critics[net], updates)}
        opt_state = new_state
        online = {**online, **critics}
        target = {**target, **optax.incremental_update(critics, {"q": target["q"], "v": target["v"]}, TAU)}
        return online, target, opt_state, key, loss

    def policy_step(online, target, opt_state, key, batch):
        key, k_a, k_z, k_b = jax.random.split(key, 4)
        action_n, step = _noised(tables, k_a, batch["act"], N)
        z = jax.random.normal(k_z, (B, M, A), jnp.float32)

        def actor_loss(actor):
            return -one_step_objective(actor, target, tables, batch["obs"], action_n, step, z)[0].mean()

        a_loss, a_grads = jax.value_and_grad(actor_loss)(online["actor"])
        a_updates, a_state = actor_tx.update(a_grads, opt_state["actor"], online["actor"])
        actor = optax.apply_updates(online["actor"], a_updates)
        behavior, b_state, behavior_tgt, b_loss = behavior_step(
            online["behavior"], opt_state["behavior"], target["behavior"], k_b, batch["obs"], batch["act"], abar, behavior_tx
        )
        online = {**online, "actor": actor, "behavior": behavior}
        target = {**target, "actor": optax.incremental_update(actor, target["actor"], TAU), "behavior": behavior_tgt}
        return online, target, {**opt_state, "actor": a_state, "behavior": b_state}, key, a_loss + b_loss

    def wrap(fn, which):
        def inner(online, target, opt_state, key, batch):
            sub = opt_state[which] if which != "policy" else opt_state
            online, target, new, key, loss = fn(online, target, sub, key, batch)
            opt_state = {**opt_state, which: new} if which != "policy" else new
            return online, target, opt_state, key, loss

        return jax.jit(inner, donate_argnums=(0, 1, 2, 3))

    steps = {"jax_critic": wrap(critic_step, "critic"), "jax_policy": wrap(policy_step, "policy")}
    return _timed_steps(steps, (online, target, opt, key), batch)


# ------------------------------------------------------------------------------ workers
def _torch_variants(preset: str, phase: str) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    import bench_bdpo as bench

    cfg = bench.PRESETS[preset]
    bench.OBS, bench.ACT = cfg["obs_dim"], cfg["act_dim"]
    torch.manual_seed(0)
    device = torch.device("cpu")
    update = bench.make_update(device, compile=True, N=cfg["N"])
    batch = bench.make_batch(cfg["batch"], device, terminal=cfg["terminal"])
    done = lambda: None  # noqa: E731  (torch's CPU steps return when done)
    if phase == "phase_b":
        return {"ours_critic": (lambda: update.critic(batch), done), "ours_policy": (lambda: update.policy(batch), done)}
    regular = bench.make_update(device, compile=True, N=cfg["N"])
    regular._behavior_program = None  # the compiled loss method, autograd's backward, clip_grad_norm_
    bare = bench.bare_mlp_step(device, cfg["batch"], compile=True)
    return {"ours": (lambda: update.behavior(batch), done), "ours_regular_step": (lambda: regular.behavior(batch), done), "bare_mlp": (bare, done)}


def _jax_variants(preset: str, phase: str) -> dict:
    if phase == "phase_b":
        return make_jax_phase_b(preset)
    return {"jax_xla": make_jax_step(preset)}


WORKERS = {"torch": _torch_variants, "jax": _jax_variants}


def _say(obj) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker(kind: str, preset: str, phase: str) -> None:
    """Build this worker's variants (compile, warm up), then answer ``{"time": name, "steps": S,
    "warmup": W}`` lines on stdin with ``{"seconds_per_step": ...}`` until stdin closes."""
    t0 = time.perf_counter()
    variants = WORKERS[kind](preset, phase)
    for step, block in variants.values():
        for _ in range(3):  # compilation and warm-up
            step()
        block()
    _say({"ready": sorted(variants), "setup_s": time.perf_counter() - t0, "versions": _versions()})
    for line in sys.stdin:
        request = json.loads(line)
        step, block = variants[request["time"]]
        for _ in range(request["warmup"]):
            step()
        block()
        t = time.perf_counter()
        for _ in range(request["steps"]):
            step()
        block()
        _say({"seconds_per_step": (time.perf_counter() - t) / request["steps"]})


class Worker:
    """A worker process driven over its stdin / stdout."""

    def __init__(self, kind: str, preset: str, phase: str) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--preset", preset, "--phase", phase]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.kind = kind
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.hello = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX) :])
            sys.stdout.write(line)
        code = self.proc.wait()
        raise RuntimeError(f"the {self.kind} worker exited with code {code} before answering (see its output above).")

    def time(self, name: str, steps: int, warmup: int) -> float:
        self.proc.stdin.write(json.dumps({"time": name, "steps": steps, "warmup": warmup}) + "\n")
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
    workers = {}
    warmup = 1 if args.phase == "phase_b" else 2
    try:
        for kind in args.workers:
            workers[kind] = Worker(kind, args.preset, args.phase)
            print(kind, "worker ready:", workers[kind].hello, flush=True)
        owner = {name: w for w in workers.values() for name in w.hello["ready"]}
        names = list(owner)
        rounds = []
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]  # rotated: no variant always first
            res = {name: 1.0 / owner[name].time(name, args.steps, warmup) for name in order}
            if args.phase == "phase_b":  # a critic step every step, actor + behavior every 5th
                for fw in ("ours", "jax"):
                    if f"{fw}_critic" in res:
                        res[f"{fw}_phase_b"] = 1.0 / (1.0 / res[f"{fw}_critic"] + 0.2 / res[f"{fw}_policy"])
            rounds.append(res)
            print(f"round {r + 1}/{args.rounds} steps/s", json.dumps({k: round(v, 3) for k, v in res.items()}), flush=True)
    finally:
        for w in workers.values():
            w.close()
    names = list(rounds[0])
    out = {
        "date": str(date.today()),
        "device": f"cpu: {cpu_name()} ({os.cpu_count()} logical cores)",
        "command": "python benchmarks/jax_reference.py " + " ".join(sys.argv[1:]),
        "settings": {
            "phase": args.phase,
            "preset": args.preset,
            **PRESETS[args.preset],
            "hidden": HIDDEN,
            "depth": DEPTH,
            "steps_per_timing": args.steps,
            "rounds": args.rounds,
        },
        "versions": {k: w.hello.get("versions") for k, w in workers.items()},
        "setup_s": {k: w.hello["setup_s"] for k, w in workers.items()},
        "steps_per_s": {name: statistics.median(r[name] for r in rounds) for name in names},
        "rounds_steps_per_s": rounds,
    }
    base = "jax_phase_b" if args.phase == "phase_b" else "jax_xla"
    if base in names:
        compared = [n for n in (["ours_phase_b"] if args.phase == "phase_b" else names) if n in names and n != base]
        out["over_jax_xla"] = {name: statistics.median(r[name] / r[base] for r in rounds) for name in compared}
        reference = (AUTHORS_PHASE_B if args.phase == "phase_b" else AUTHORS_PRETRAIN)[args.preset]
        out["authors_figure_steps_per_s"] = reference
        # how this host compares with the one behind the figure, if ours is like theirs
        out["jax_xla_over_authors_figure"] = out["steps_per_s"][base] / reference
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
    p.add_argument(
        "--phase", choices=("pretrain", "phase_b"), default="pretrain", help="pretrain: the behavior step (default); phase_b: critic and actor + behavior steps"
    )
    p.add_argument("--steps", type=int, default=None, help="steps per timing (default: 100 pretrain, 3 phase B)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="JSON out (default: benchmarks/results/jax_reference_<phase>_<preset>.json)")
    p.add_argument(
        "--workers", nargs="+", choices=tuple(WORKERS), default=list(WORKERS), help="which processes to run (default: both; `--workers torch` runs without JAX)"
    )
    p.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.phase == "phase_b" else 100
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)}: expected an integer >= 1.")
    if args.worker:
        return worker(args.worker, args.preset, args.phase)
    if "jax" in args.workers:
        try:
            _jax()
        except ImportError as err:
            p.error(f"JAX is not installed ({err}): `pip install jax optax` (CPU), or pass --workers torch.")
    out_path = args.out or HERE / "results" / f"jax_reference_{args.phase}_{args.preset}.json"
    result = run(args)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("steps_per_s", "over_jax_xla", "jax_xla_over_authors_figure") if k in result}))
    print(f"written to {out_path}")
    return result


if __name__ == "__main__":
    main()
