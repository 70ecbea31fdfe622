import time

import pytest
import torch
from tensordict import TensorDict
from torchrl.objectives import SoftUpdate

from torchrl_bdpo.diffusion import DiffusionActor, EpsilonNetwork, make_schedule
from torchrl_bdpo.metrics import mmd_rbf, sliced_wasserstein
from torchrl_bdpo.objectives import DenoisingLoss

from tests.helpers import assert_reductions_agree


def make_actor(N=5, hidden=32, obs_dim=3, depth=2):
    return DiffusionActor(EpsilonNetwork(2, obs_dim, hidden=hidden, depth=depth), make_schedule("vp", N))


def batch(n=8):
    return TensorDict({"observation": torch.randn(n, 3), "action": torch.rand(n, 2) * 2 - 1}, [n])


def test_loss_is_the_eps_mse():
    actor = make_actor()
    loss = DenoisingLoss(actor)
    data = batch()
    torch.manual_seed(3)
    out = loss(data)["loss_denoising"]
    # redo by hand with the same random draws
    torch.manual_seed(3)
    a = data["action"]
    n = torch.randint(1, 6, (8,))
    eps = torch.randn_like(a)
    s = actor.schedule
    a_n = s.alphas_cumprod[n].sqrt().unsqueeze(-1) * a + (1 - s.alphas_cumprod[n]).sqrt().unsqueeze(-1) * eps
    expected = ((actor.network(a_n, n, data["observation"]) - eps) ** 2).mean()
    torch.testing.assert_close(out, expected)


def test_keys_reduction_and_grads():
    actor = make_actor()
    loss = DenoisingLoss(actor)
    assert loss.in_keys == ["observation", "action"]
    assert loss.out_keys == ["loss_denoising"]
    data = batch()
    assert_reductions_agree(loss, data, "loss_denoising", rows=8, seed=1).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in actor.network.parameters() if p.ndim == 2)

    loss.set_keys(observation="obs", action="act")
    assert loss.in_keys == ["obs", "act"]
    renamed = TensorDict({"obs": data["observation"], "act": data["action"]}, [8])
    assert loss(renamed)["loss_denoising"].shape == ()  # reduction is still "sum"
    with pytest.raises(ValueError, match="not an accepted tensordict key"):
        loss.set_keys(reward="r")


def test_state_dict_round_trip_and_ema():
    actor = make_actor()
    loss = DenoisingLoss(actor, delay_actor=True)
    updater = SoftUpdate(loss, tau=0.5)
    optim = torch.optim.Adam(loss.parameters(), lr=1e-2)
    loss(batch())["loss_denoising"].backward()
    optim.step()
    before = loss.target_actor_network_params.clone()
    updater.step()
    for key, online in loss.actor_network_params.items(True, True):
        expected = 0.5 * before[key] + 0.5 * online.data
        torch.testing.assert_close(loss.target_actor_network_params[key], expected)
    other = DenoisingLoss(make_actor(), delay_actor=True)
    other.load_state_dict(loss.state_dict())
    for key, val in loss.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], val)


def test_bad_input():
    loss = DenoisingLoss(make_actor())
    data = batch()
    data["action"][2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"tensordict\['action'\] holds 1 non-finite"):
        loss(data)
    with pytest.raises(ValueError, match="expected a last dimension of 2"):
        loss(TensorDict({"observation": torch.randn(4, 3), "action": torch.randn(4, 5)}, [4]))
    with pytest.raises(ValueError, match="expected a DiffusionActor"):
        DenoisingLoss(torch.nn.Linear(2, 2))


def four_modes(n, generator=None):
    centers = torch.tensor([[0.5, 0.5], [-0.5, 0.5], [-0.5, -0.5], [0.5, -0.5]])
    idx = torch.randint(0, 4, (n,), generator=generator)
    return centers[idx] + 0.15 * torch.randn(n, 2, generator=generator)


def test_denoising_reproduces_a_2d_mixture():
    """N=20 vp, 3 x 64 net, 1500 Adam steps: MMD^2 to the data below 0.06 and 1/3 of a moment-matched Gaussian's.

    Measured on a 2-core CPU: about 10 s, MMD^2 ~0.03 (Gaussian ~0.14, data-to-data ~0.00).
    N=5 with sigma^2 = beta cannot reproduce a sharp mixture (the last step returns the
    posterior mean at noise std 0.44): that setting is for Q-guided RL, not density fitting.
    """
    actor = make_actor(N=20, hidden=64, obs_dim=1, depth=3)
    loss = DenoisingLoss(actor)
    optim = torch.optim.Adam(loss.parameters(), lr=3e-3)
    obs = torch.zeros(256, 1)
    start = time.perf_counter()
    for _ in range(1500):
        out = loss(TensorDict({"observation": obs, "action": four_modes(256)}, [256]))
        optim.zero_grad()
        out["loss_denoising"].backward()
        optim.step()
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        samples = actor.sample_path(torch.zeros(2000, 1)).action
    g = torch.Generator().manual_seed(1)
    ref, ref2 = four_modes(2000, g), four_modes(2000, g)
    gauss = ref2.mean(0) + torch.randn(2000, 2, generator=g) @ torch.linalg.cholesky(torch.cov(ref2.T)).T
    mmd_model, mmd_gauss = mmd_rbf(samples, ref).item(), mmd_rbf(gauss, ref).item()
    print(f"trained in {elapsed:.1f}s; MMD^2 model {mmd_model:.4f}, gaussian {mmd_gauss:.4f}")
    assert mmd_model < 0.06
    assert mmd_model < mmd_gauss / 3
    assert sliced_wasserstein(samples, ref, generator=g) < sliced_wasserstein(gauss, ref, generator=g)
