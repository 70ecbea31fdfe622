"""benchmarks/jax_reference.py: its JAX step computes our behavior step, and its driver runs.

The JAX checks need ``pip install jax optax`` (not a dependency of the package: only this
benchmark uses them) and are skipped without; the schedule check and the torch-only run of
the driver need neither.
"""
import json

import numpy as np
import pytest
import torch

from tests.test_benchmark_smoke import load_benchmark
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
        params, opt_state, jtarget, jloss = ref.update(
            params, opt_state, jtarget, j["obs"], j["act"], j["n"], j["noise"], abar_j, optimizer
        )
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
