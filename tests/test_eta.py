"""eta as a live buffer (set_eta) and the automatic eta of EtaLagrangian."""

import math
import warnings

import pytest
import torch
from tensordict import TensorDict

from torchrl_bdpo.diffusion import DiffusionActor, EpsilonNetwork, make_qvalue_operator, make_schedule, make_value_operator
from torchrl_bdpo.objectives import BDPOLoss
from torchrl_bdpo.training import EtaLagrangian


def make_loss(eta=0.2, obs_dim=3, action_dim=2):
    schedule = make_schedule("vp", 5)

    def model():
        return DiffusionActor(EpsilonNetwork(action_dim, obs_dim, hidden=16, depth=2), schedule)

    return BDPOLoss(
        model(),
        model(),
        make_value_operator(obs_dim, action_dim, hidden=16, depth=2, num_steps=5),
        make_qvalue_operator(obs_dim, action_dim, hidden=16),
        eta=eta,
        rho=1.0,
        num_qvalue_nets=2,
        num_samples=3,
    )


def batch(n=8, obs_dim=3, action_dim=2):
    return TensorDict(
        {
            "observation": torch.randn(n, obs_dim),
            "action": torch.rand(n, action_dim) * 2 - 1,
            "next": {
                "observation": torch.randn(n, obs_dim),
                "reward": torch.randn(n, 1),
                "terminated": torch.arange(n).reshape(n, 1) % 3 == 0,
                "done": torch.arange(n).reshape(n, 1) % 3 == 0,
            },
        },
        [n],
    )


def test_set_eta_moves_the_q_target_by_gamma_eta_kl():
    """y_Q = r + gamma (1 - term) (Q - eta KL): changing eta moves it by -gamma d_eta KL, exactly."""
    loss, td = make_loss(), batch()
    noise = torch.randn(6, 8, 3, 2)
    y1, kl, _ = loss.qvalue_target(td, noise=noise)
    loss.set_eta(0.7)
    assert float(loss.eta) == pytest.approx(0.7)
    y2, kl2, _ = loss.qvalue_target(td, noise=noise)
    torch.testing.assert_close(kl2, kl)
    live = ~td["next", "terminated"].reshape(-1)
    torch.testing.assert_close(y2 - y1, -0.99 * 0.5 * kl * live, rtol=1e-5, atol=1e-5)
    assert "_eta" not in loss.state_dict()  # the config sets eta; EtaLagrangian saves its own
    with pytest.raises(ValueError, match="eta=-1.0"):
        loss.set_eta(-1)


def test_lagrangian_raises_eta_above_the_target_and_lowers_it_below():
    loss = make_loss(eta=0.2)
    tuner = EtaLagrangian(loss, target_kl_per_dim=0.5, lr=1e-2)
    assert tuner.target_kl == 1.0  # 0.5 nats x 2 action dims
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Converting a tensor with requires_grad")  # the logged loss is detached
        out = tuner.step(torch.tensor(3.0))
    assert out["eta"] > 0.2 and float(loss.eta) == pytest.approx(out["eta"])
    for _ in range(5):
        tuner.step(0.1)
    assert tuner.eta < out["eta"]
    assert tuner.step(float("nan")) == {}  # a batch with no live next state


def test_lagrangian_settles_where_the_kl_meets_the_target():
    """With a KL that falls as 2 / eta, the dual settles at eta = 2 for a target KL of 1."""
    loss = make_loss(eta=0.2)
    tuner = EtaLagrangian(loss, target_kl_per_dim=0.5, lr=0.05)
    for _ in range(3000):
        tuner.step(2.0 / tuner.eta)
    assert tuner.eta == pytest.approx(2.0, rel=0.05)
    # state round trip
    other = EtaLagrangian(make_loss(eta=0.2), target_kl_per_dim=0.5, lr=0.05)
    other.load_state_dict(tuner.state_dict())
    assert other.eta == tuner.eta and float(other.loss_module[0].eta) == pytest.approx(tuner.eta)
    assert math.isclose(other.optimizer.state_dict()["state"][0]["step"], tuner.optimizer.state_dict()["state"][0]["step"])


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="target_kl_per_dim=0"):
        EtaLagrangian(make_loss(), target_kl_per_dim=0)
    with pytest.raises(ValueError, match="lr=-1"):
        EtaLagrangian(make_loss(), target_kl_per_dim=1.0, lr=-1)


def test_moved_names_keep_deprecated_aliases():
    import importlib

    import torchrl_bdpo.objectives as objectives
    import torchrl_bdpo.training as training

    for name in ("BDPOUpdate", "make_capturable", "EtaLagrangian"):
        with pytest.warns(DeprecationWarning, match=f"torchrl_bdpo.objectives.{name} is deprecated"):
            assert getattr(objectives, name) is getattr(training, name)
    with pytest.warns(DeprecationWarning, match="torchrl_bdpo.trainers is deprecated"):
        import torchrl_bdpo.trainers as trainers

        importlib.reload(trainers)
    assert trainers.BDPOOptimizationStepper is training.BDPOOptimizationStepper
