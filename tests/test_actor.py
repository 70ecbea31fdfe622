import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_bdpo.diffusion import DiffusionActor, EpsilonNetwork, make_schedule


def make_actor(N=5, **kwargs):
    return DiffusionActor(EpsilonNetwork(2, 3, hidden=32, depth=2), make_schedule("vp", N), **kwargs)


@pytest.mark.parametrize("batch", [(), (4,), (2, 3)])
@pytest.mark.parametrize("num_samples", [None, 6])
def test_path_shapes(batch, num_samples):
    actor = make_actor()
    path = actor.sample_path(torch.randn(*batch, 3), num_samples=num_samples)
    extra = () if num_samples is None else (num_samples,)
    assert path.actions.shape == (6, *batch, *extra, 2)
    assert path.eps.shape == (5, *batch, *extra, 2)
    torch.testing.assert_close(path.action, path.actions[0])


def test_path_is_the_chain_of_reverse_steps():
    actor = make_actor()
    obs = torch.randn(4, 3)
    noise = torch.randn(6, 4, 2)
    path = actor.sample_path(obs, noise=noise)
    torch.testing.assert_close(path.actions[5], noise[5])
    for n in range(5, 0, -1):
        nxt, eps = actor.reverse_step(obs, path.actions[n], n, noise[n - 1])
        torch.testing.assert_close(eps, path.eps[n - 1])
        torch.testing.assert_close(nxt, path.actions[n - 1])
        expected = actor.schedule.reverse_mean(path.actions[n], n, eps) + (actor.schedule.sigmas[n] * noise[n - 1] if n > 1 else 0)
        torch.testing.assert_close(nxt, expected)
    # the same noise gives the same path
    torch.testing.assert_close(actor.sample_path(obs, noise=noise).actions, path.actions)


def test_tensor_step_matches_int_step():
    actor = make_actor()
    obs, a = torch.randn(4, 3), torch.randn(4, 2)
    z = torch.randn(4, 2)
    n = torch.tensor([1, 2, 3, 5])
    out, _ = actor.reverse_step(obs, a, n, z)
    for i in range(4):
        ref, _ = actor.reverse_step(obs[i : i + 1], a[i : i + 1], int(n[i]), z[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], ref)


def test_exploration_types():
    actor = make_actor()
    td = TensorDict({"observation": torch.randn(4, 3)}, [4])
    # no type set and RANDOM: samples, different each call
    a1, a2 = actor(td.clone())["action"], actor(td.clone())["action"]
    assert not torch.allclose(a1, a2)
    with set_exploration_type(ExplorationType.RANDOM):
        assert not torch.allclose(actor(td.clone())["action"], actor(td.clone())["action"])
    for etype in (ExplorationType.DETERMINISTIC, ExplorationType.MODE, ExplorationType.MEAN):
        with set_exploration_type(etype):
            d1, d2 = actor(td.clone())["action"], actor(td.clone())["action"]
        torch.testing.assert_close(d1, d2)
        torch.testing.assert_close(d1, actor.sample_path(td["observation"], deterministic=True).action)


def test_keys_and_num_samples():
    actor = make_actor(in_keys=[("agent", "obs")], out_keys=["act"], num_samples=3)
    td = TensorDict({("agent", "obs"): torch.randn(4, 3)}, [4])
    assert actor(td)["act"].shape == (4, 3, 2)


def test_clip_denoised_bounds_actions():
    actor = make_actor(clip_denoised=True)
    with torch.no_grad():
        actor.network.body[-1].bias.fill_(-50.0)  # huge eps: unclipped x0 far outside [-1, 1]
    a = actor.sample_path(torch.randn(64, 3)).action
    assert a.abs().max() <= 1.0
    unclipped = make_actor(clip_denoised=False)
    unclipped.load_state_dict(actor.state_dict())
    assert unclipped.sample_path(torch.randn(64, 3)).action.abs().max() > 1.0


def test_bad_input():
    actor = make_actor()
    with pytest.raises(ValueError, match="non-finite"):
        actor(TensorDict({"observation": torch.tensor([[0.0, float("nan"), 1.0]])}, [1]))
    with pytest.raises(ValueError, match=r"observation has shape \(4, 4\)"):
        actor(TensorDict({"observation": torch.randn(4, 4)}, [4]))
    with pytest.raises(ValueError, match="noise has shape"):
        actor.sample_path(torch.randn(4, 3), noise=torch.randn(5, 4, 2))
    with pytest.raises(ValueError, match="action_dim=3 but the network predicts eps of dimension 2"):
        DiffusionActor(EpsilonNetwork(2, 3), make_schedule("vp", 5), action_dim=3)
    with pytest.raises(ValueError, match="expected a NoiseSchedule"):
        DiffusionActor(EpsilonNetwork(2, 3), "vp")


def test_cached_chain_with_samples_matches_plain_steps_and_gradients():
    # sample_path shares the time MLP and the observation's first-layer part across the chain;
    # the path and the gradients through it equal plain reverse steps on the expanded observation
    actor = make_actor()
    obs = torch.randn(4, 3)
    noise = torch.randn(6, 4, 7, 2)
    path = actor.sample_path(obs, num_samples=7, noise=noise)
    obs_m = obs.unsqueeze(-2).expand(4, 7, 3)
    action, actions = noise[5], [noise[5]]
    for n in range(5, 0, -1):
        action, _ = actor.reverse_step(obs_m, action, n, noise[n - 1])
        actions.append(action)
    torch.testing.assert_close(path.actions, torch.stack(actions[::-1]), rtol=1e-5, atol=2e-5)
    params = list(actor.parameters())
    g_path = torch.autograd.grad(path.action.pow(2).sum(), params)
    g_plain = torch.autograd.grad(actions[-1].pow(2).sum(), params)
    for a, b in zip(g_path, g_plain):  # float32 rounding, amplified along the chain
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-6, ((a - b).norm(), b.norm())
