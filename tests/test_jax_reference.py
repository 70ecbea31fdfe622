"""benchmarks/jax_reference.py: its JAX step computes our behavior step, and its driver runs.

The JAX checks need ``pip install jax optax`` (not a dependency of the package: only this
benchmark uses them) and are skipped without; the schedule check and the torch-only run of
the driver need neither.
"""

import json

import numpy as np
import pytest
import torch

from tests.loaders import load_benchmark
from torchrl_bdpo.diffusion import EpsilonNetwork, make_schedule

ref = load_benchmark("jax_reference")


@pytest.mark.parametrize("N", [5, 50])
def test_schedule_is_ours(N):
    np.testing.assert_allclose(ref.vp_alphas_cumprod(N), make_schedule("vp", N).alphas_cumprod.numpy(), rtol=1e-6)


def _torch_step(net, obs, act, n, noise, abar, opt, target):
    """Our behavior step with given draws: loss, backward, clip, Adam, target EMA."""
    a_bar = abar[n].unsqueeze(-1)
    noisy = a_bar.sqrt() * act + (1 - a_bar).sqrt() * noise
    opt.zero_grad()
    loss = (net(noisy, n, obs) - noise).pow(2).mean()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), ref.CLIP)
    opt.step()
    with torch.no_grad():
        for t, p in zip(target.parameters(), net.parameters()):
            t.lerp_(p, ref.TAU)
    return loss, norm


def test_jax_step_computes_our_behavior_step():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    pytest.importorskip("optax")
    N, B, O, A = 5, 64, 3, 2
    torch.manual_seed(0)
    net = EpsilonNetwork(A, O)
    target = EpsilonNetwork(A, O)
    target.load_state_dict(net.state_dict())
    obs, act = torch.randn(B, O), torch.rand(B, A) * 2 - 1
    n, noise = torch.randint(1, N + 1, (B,)), torch.randn(B, A)
    abar = make_schedule("vp", N).alphas_cumprod
    params = ref.params_from_torch(net)
    j = {k: jnp.asarray(v.numpy()) for k, v in dict(obs=obs, act=act, n=n, noise=noise).items()}
    # the network
    eps = ref.eps_net(params, jnp.asarray(act.numpy()), j["n"], j["obs"])
    np.testing.assert_allclose(np.asarray(eps), net(act, n, obs).detach().numpy(), rtol=1e-4, atol=1e-5)
    # three full steps, the clip acting on each (the net starts untrained)
    opt = torch.optim.Adam(net.parameters(), lr=ref.LR)
    optimizer = ref.make_optimizer()
    opt_state, jtarget = optimizer.init(params), jax.tree_util.tree_map(jnp.copy, params)
    abar_j = jnp.asarray(ref.vp_alphas_cumprod(N))
    for _ in range(3):
        loss, norm = _torch_step(net, obs, act, n, noise, abar, opt, target)
        assert norm > ref.CLIP
        params, opt_state, jtarget, jloss = ref.update(params, opt_state, jtarget, j["obs"], j["act"], j["n"], j["noise"], abar_j, optimizer)
        assert float(jloss) == pytest.approx(loss.item(), rel=1e-4)
    moved = ref.params_from_torch(net)
    for mine, theirs in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(moved)):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=1e-4, atol=2e-6)
    for mine, theirs in zip(jax.tree_util.tree_leaves(jtarget), jax.tree_util.tree_leaves(ref.params_from_torch(target))):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=1e-4, atol=2e-6)


def test_driver_times_the_torch_variants_without_jax(tmp_path):
    out = tmp_path / "ref.json"
    result = ref.main(["--preset", "toy", "--workers", "torch", "--steps", "2", "--rounds", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["steps_per_s"] == result["steps_per_s"]
    assert set(saved["steps_per_s"]) == {"ours", "ours_regular_step", "bare_mlp"}
    assert len(saved["rounds_steps_per_s"]) == 2 and all(v > 0 for v in saved["steps_per_s"].values())
    assert "over_jax_xla" not in saved  # nothing to compare with
    assert saved["settings"]["N"] == 50 and saved["settings"]["batch"] == 512


def test_driver_rejects_bad_counts():
    with pytest.raises(SystemExit):
        ref.main(["--rounds", "0"])


def test_jax_phase_b_targets_are_ours():
    """The Q target (chains, path KL, Q ensemble, LCB) and the one-step objective (V / Q at
    n - 1, step KL) of the JAX phase-B step equal our loss's, from the same parameters and draws."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    bench = load_benchmark("bench_bdpo")
    N, B = 5, 6
    torch.manual_seed(0)
    loss = bench.make_loss(N=N)  # the benchmark's D4RL-sized loss: K = M = 10, eta 0.15, rho 1
    assert (loss.num_qvalue_nets, loss.num_samples, loss.eta, loss.rho) == (ref.K, ref.M, ref.ETA, ref.RHO)

    def leaves(td):
        return dict(td.items(include_nested=True, leaves_only=True))

    # targets: perturbed away from the online copies, so that using the wrong set would show
    with torch.no_grad():
        for name in ("actor", "behavior", "qvalue", "value"):
            for key, p in leaves(getattr(loss, f"target_{name}_network_params")).items():
                if key[-1] in ("weight", "bias"):  # not the buffers (the sinusoid's frequencies)
                    p.add_(0.01 * torch.randn_like(p))
    tgt = {
        "actor": ref.params_from_leaves(leaves(loss.target_actor_network_params)),
        "behavior": ref.params_from_leaves(leaves(loss.target_behavior_network_params)),
        "q": ref.params_from_leaves(leaves(loss.target_qvalue_network_params)),
        "v": ref.params_from_leaves(leaves(loss.target_value_network_params)),
    }
    tables = {k: jnp.asarray(v) for k, v in ref.vp_tables(N).items()}
    schedule = loss.actor_network.schedule
    for name, mine in (
        ("kl_w", schedule.kl_weights),
        ("coef_x0", schedule.posterior_mean_coef_x0),
        ("coef_xt", schedule.posterior_mean_coef_xt),
        ("scales", schedule.noise_scales),
    ):
        np.testing.assert_allclose(np.asarray(tables[name]), mine.numpy(), rtol=1e-5, atol=1e-7, err_msg=name)
    A, O = bench.ACT, bench.OBS
    next_obs, noise = torch.randn(B, O), torch.randn(N + 1, B, ref.M, A)
    with torch.no_grad():
        value, _, _ = loss.next_state_value(next_obs, torch.zeros(B, 1, dtype=torch.bool), noise=noise)
    theirs = ref.next_state_value(tgt, tables, jnp.asarray(next_obs.numpy()), jnp.asarray(noise.numpy()))
    np.testing.assert_allclose(np.asarray(theirs), value.numpy(), rtol=2e-4, atol=2e-4)
    # the one-step objective at n = 1 (Q at n - 1 = 0) and n > 1 (V), under the online actor
    obs, action_n = torch.randn(B, O), torch.randn(B, A).clamp(-2, 2)
    n = torch.tensor([1, 2, 3, 4, 5, 1])
    torch.manual_seed(7)
    z = torch.randn(B, ref.M, A)
    torch.manual_seed(7)  # one_step_objective's first draw is its z
    with torch.no_grad():
        mine = loss.one_step_objective(obs, action_n, n, loss.actor_network_params)
    actor = ref.params_from_leaves(leaves(loss.actor_network_params))
    theirs = ref.one_step_objective(actor, tgt, tables, *(jnp.asarray(t.numpy()) for t in (obs, action_n, n, z)))
    for label, a, b in zip(("J", "next_value", "step_kl"), theirs, mine):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=2e-4, atol=2e-4, err_msg=label)


def test_jax_phase_b_steps_run():
    pytest.importorskip("jax")
    steps = ref.make_jax_phase_b("d4rl")
    assert set(steps) == {"jax_critic", "jax_policy"}
    for step, block in steps.values():
        step()
        block()


def test_driver_without_jax_says_how_to_install_it(monkeypatch, capsys):
    def missing():
        raise ImportError("No module named 'jax'")

    monkeypatch.setattr(ref, "_jax", missing)
    with pytest.raises(SystemExit):
        ref.main(["--preset", "toy", "--rounds", "1"])
    err = capsys.readouterr().err
    assert "JAX is not installed" in err and "pip install jax optax" in err and "--workers torch" in err
