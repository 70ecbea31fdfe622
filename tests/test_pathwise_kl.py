import copy

import pytest
import torch
from tensordict import TensorDict
from torch.distributions import Independent, Normal, kl_divergence

from torchrl_bdpo.diffusion import DiffusionActor, EpsilonNetwork, make_schedule
from torchrl_bdpo.objectives import PathwiseKLLoss

from tests.helpers import assert_reductions_agree


def make_actor(N=5, schedule="vp", sigma="beta", action_dim=2, obs_dim=3, seed=0):
    torch.manual_seed(seed)
    return DiffusionActor(EpsilonNetwork(action_dim, obs_dim, hidden=32, depth=2), make_schedule(schedule, N, sigma=sigma))


def pair(**kwargs):
    return make_actor(seed=0, **kwargs), make_actor(seed=1, **kwargs)


def obs_td(n=16):
    return TensorDict({"observation": torch.randn(n, 3)}, [n])


@pytest.mark.parametrize("sigma", ["beta", "posterior"])
def test_step_kl_equals_gaussian_kl(sigma):
    policy, reference = pair(sigma=sigma)
    loss = PathwiseKLLoss(policy, reference)
    s = policy.schedule
    obs, a = torch.randn(10, 3), torch.randn(10, 2)
    for n in range(1, 6):
        l_n = loss.step_kl(obs, a, n)
        mu_pi = s.reverse_mean(a, n, policy.predict_eps(a, n, obs))
        mu_nu = s.reverse_mean(a, n, reference.predict_eps(a, n, obs))
        std = s.kl_sigmas[n]
        expected = kl_divergence(Independent(Normal(mu_pi, std), 1), Independent(Normal(mu_nu, std), 1))
        torch.testing.assert_close(l_n, expected, rtol=1e-4, atol=1e-6)


def test_monte_carlo_log_ratio_matches_sum_of_step_kls():
    """E_pi[log p_pi(path) - log p_nu(path)] = E_pi[sum_n l_n], kernels N(mu_n, beta_n) at every step."""
    policy, reference = pair()
    with torch.no_grad():
        for p in policy.network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss = PathwiseKLLoss(policy, reference)
    s = policy.schedule
    M = 20000
    obs = torch.randn(1, 3).expand(M, 3)
    a = torch.randn(M, 2)
    log_ratio = torch.zeros(M)
    kl_sum = torch.zeros(M)
    with torch.no_grad():
        for n in range(5, 0, -1):
            mu_pi = s.reverse_mean(a, n, policy.predict_eps(a, n, obs))
            mu_nu = s.reverse_mean(a, n, reference.predict_eps(a, n, obs))
            std = s.kl_sigmas[n]
            kl_sum += loss.step_kl(obs, a, n)
            a = mu_pi + std * torch.randn_like(a)
            log_ratio += Normal(mu_pi, std).log_prob(a).sum(-1) - Normal(mu_nu, std).log_prob(a).sum(-1)
    diff = log_ratio - kl_sum
    se = diff.std() / M**0.5
    assert kl_sum.mean() > 0.05  # a KL large enough to make the check meaningful
    assert diff.mean().abs() < 4 * se, (log_ratio.mean(), kl_sum.mean(), se)
    assert (log_ratio.mean() - kl_sum.mean()).abs() < 0.05 * kl_sum.mean()


def test_kl_zero_for_identical_models_and_positive_otherwise():
    policy = make_actor()
    reference = copy.deepcopy(policy)
    loss = PathwiseKLLoss(policy, reference)
    out = loss(obs_td())
    assert out["loss_kl"].abs() < 1e-10
    assert out["kl_per_step"].abs().max() < 1e-10
    loss2 = PathwiseKLLoss(*pair())
    out2 = loss2(obs_td())
    assert out2["loss_kl"] > 0 and (out2["kl_per_step"] > 0).all()
    assert out2["kl_per_step"].shape == (5,)


@pytest.mark.parametrize("detach_path", [False, True])
def test_gradients_reach_only_the_policy(detach_path):
    policy, reference = pair()
    loss = PathwiseKLLoss(policy, reference, detach_path=detach_path)
    n_ref = sum(p.numel() for p in reference.parameters())
    n_loss = sum(p.numel() for p in loss.parameters())
    assert n_loss == sum(p.numel() for p in policy.parameters())  # reference is not trainable
    loss(obs_td())["loss_kl"].backward()
    assert all(p.grad is not None for p in policy.network.parameters())
    assert all(p.grad is None for p in reference.parameters())
    assert n_ref > 0


def test_detached_and_reparameterised_values_agree():
    policy, reference = pair()
    obs = torch.randn(8, 3)
    noise = torch.randn(6, 8, 2)
    a = PathwiseKLLoss(policy, reference, detach_path=False).path_kl(obs, noise=noise)
    b = PathwiseKLLoss(policy, reference, detach_path=True).path_kl(obs, noise=noise)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    # path KL is the sum of the per-step terms computed by step_kl along the path
    loss = PathwiseKLLoss(policy, reference)
    for n in range(1, 6):
        torch.testing.assert_close(a[1][n - 1], loss.step_kl(obs, a[2].actions[n], n))


def test_reference_updates_are_seen():
    policy, reference = pair()
    loss = PathwiseKLLoss(policy, reference)
    obs, a = torch.randn(4, 3), torch.randn(4, 2)
    before = loss.step_kl(obs, a, 2)
    reference.load_state_dict(policy.state_dict())  # an external (EMA-style) update
    torch.testing.assert_close(loss.step_kl(obs, a, 2), torch.zeros(4))
    assert before.abs().sum() > 0


def test_keys_reduction_samples_state_dict():
    policy, reference = pair()
    loss = PathwiseKLLoss(policy, reference, num_samples=4)
    assert loss.in_keys == ["observation"] and loss.out_keys == ["loss_kl", "kl_per_step"]
    td = obs_td(6)
    assert_reductions_agree(loss, td, "loss_kl", rows=6, seed=2)
    kl, per_step, path = loss.path_kl(td["observation"])
    assert kl.shape == (6, 4) and per_step.shape == (5, 6, 4) and path.action.shape == (6, 4, 2)

    loss.set_keys(observation=("agent", "obs"))
    assert loss.in_keys == [("agent", "obs")]
    assert loss(TensorDict({("agent", "obs"): torch.randn(6, 3)}, [6]))["loss_kl"].shape == ()  # "sum"

    other = PathwiseKLLoss(*pair(), num_samples=4)
    other.load_state_dict(loss.state_dict())
    for key, val in loss.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], val)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(N=6), "different noise schedules"),
        (dict(schedule="cosine"), "different noise schedules"),
        (dict(sigma="posterior"), "different noise schedules"),
        (dict(action_dim=3), "action_dim"),
        (dict(obs_dim=4), "observation_dim"),
    ],
)
def test_mismatched_models(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PathwiseKLLoss(make_actor(), make_actor(**kwargs))


def test_bad_input():
    loss = PathwiseKLLoss(*pair())
    with pytest.raises(ValueError, match="non-finite"):
        loss(TensorDict({"observation": torch.full((2, 3), float("nan"))}, [2]))
    with pytest.raises(ValueError, match=r"observation has shape \(2, 5\)"):
        loss(TensorDict({"observation": torch.randn(2, 5)}, [2]))
    with pytest.raises(ValueError, match="num_samples=0"):
        PathwiseKLLoss(*pair(), num_samples=0)
