"""torchrl_bdpo.training.fit_actor_to_reference: the online actor's start at its analytic reference."""

import pytest
import torch

from torchrl_bdpo.diffusion import DiffusionActor, EpsilonNetwork, make_qvalue_operator, make_reference, make_schedule, make_value_operator
from torchrl_bdpo.objectives import BDPOLoss
from torchrl_bdpo.training import fit_actor_to_reference, reference_path_kl

OBS, ACT = 3, 3


def make_loss(reference: str | None):
    schedule = make_schedule("vp", 5)

    def model():
        return DiffusionActor(EpsilonNetwork(ACT, OBS, hidden=32, depth=2), schedule)

    behavior = model() if reference is None else make_reference(reference, schedule, ACT, OBS)
    return BDPOLoss(
        model(), behavior, make_value_operator(OBS, ACT, hidden=16, depth=2, num_steps=5), make_qvalue_operator(OBS, ACT, hidden=16), eta=1.0, num_qvalue_nets=2
    )


def actions(loss, params, observation):
    with torch.no_grad(), params.to_module(loss.actor_network):
        return loss.actor_network.sample_path(observation).action


def test_reference_path_kl_is_the_sum_of_step_kls_along_the_reference_paths():
    torch.manual_seed(0)
    loss = make_loss(None)
    obs = torch.randn(64, OBS)
    torch.manual_seed(1)
    got = reference_path_kl(loss, obs)
    torch.manual_seed(1)  # the same reference path, drawn by hand
    behavior, actor, schedule = loss.behavior_network, loss.actor_network, loss.actor_network.schedule
    with torch.no_grad(), loss.target_behavior_network_params.to_module(behavior):
        path = behavior.sample_path(obs)
    want = torch.zeros(64)
    with torch.no_grad(), loss.actor_network_params.to_module(actor):
        for n in range(1, 6):
            eps_pi = actor.predict_eps(path.actions[n], n, obs)
            want += schedule.kl_weights[n] * (eps_pi - path.eps[n - 1]).pow(2).sum(-1)
    torch.testing.assert_close(got.detach(), want)
    assert float(want.mean()) > 0.1  # two independent networks: far from zero
    loss.init_actor_from_behavior()  # the actor is the reference: zero on every path
    assert float(reference_path_kl(loss, obs).abs().max()) == 0.0


def test_fit_brings_a_random_actor_to_the_uniform_reference():
    torch.manual_seed(0)
    loss = make_loss("uniform")
    obs = torch.randn(512, OBS)
    fresh = actions(loss, loss.actor_network_params, obs)
    reference = loss.behavior_network.sample_path(obs).action
    # a fresh eps network predicts eps near 0: its chain puts many components on the box's faces
    assert float((fresh.abs() > 0.99).float().mean()) > 0.3
    assert float((reference.abs() > 0.99).float().mean()) < 0.01
    out = fit_actor_to_reference(loss, obs, steps=400, batch_size=128, lr=1e-3)
    assert out["kl_end"] < 0.05 * out["kl_start"], out
    # the target actor (which acts and samples the Q target) is the fitted actor
    for key, value in loss.actor_network_params.items(True, True):
        assert torch.equal(value.data, loss.target_actor_network_params.get(key).data), key
    fitted = actions(loss, loss.target_actor_network_params, obs)
    assert float((fitted.abs() > 0.99).float().mean()) < 0.1
    assert abs(float(fitted.abs().mean()) - float(reference.abs().mean())) < 0.08
    assert float(fitted.mean(0).abs().max()) < 0.1  # centred, as the reference


def test_fit_to_the_gaussian_reference_and_bad_inputs():
    torch.manual_seed(0)
    loss = make_loss("gaussian")
    obs = torch.randn(256, OBS)
    out = fit_actor_to_reference(loss, obs, steps=300, batch_size=128, lr=1e-3)
    assert out["kl_end"] < 0.05 * out["kl_start"], out
    std = actions(loss, loss.actor_network_params, obs).std(0)
    assert torch.all((std - 1).abs() < 0.15), std  # N(0, I) actions (the Gaussian reference is not clipped)
    with pytest.raises(ValueError, match=r"observation: \(3,\): expected a \[num_states, observation_dim\]"):
        fit_actor_to_reference(loss, torch.zeros(3))
    with pytest.raises(ValueError, match="steps=0: expected a positive int"):
        fit_actor_to_reference(loss, obs, steps=0)
    with pytest.raises(ValueError, match="lr=-1: expected a positive learning rate"):
        fit_actor_to_reference(loss, obs, lr=-1)
