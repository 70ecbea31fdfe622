"""Training loops shared by the tests that check a loss against a known optimum."""

import torch
from tensordict import TensorDict

from torchrl_bdpo.objectives import TargetSoftUpdate


def train_value_and_actor(loss, observation, sample_action, steps: int, warmup: int) -> None:
    """V_n every step and the actor every 2nd step from ``warmup`` on, of a loss whose Q is a
    known reward and whose reference is fixed (``train_behavior=False``): Adam 1e-3 / 3e-4,
    target EMAs 0.05 / 0.005. ``sample_action(batch)`` draws each step's actions."""
    value_up = TargetSoftUpdate(loss, ("value_network",), tau=0.05)
    actor_up = TargetSoftUpdate(loss, ("actor_network",), tau=0.005)
    v_optim = torch.optim.Adam(loss.value_network_params.parameters(), lr=1e-3)
    a_optim = torch.optim.Adam(loss.actor_network_params.parameters(), lr=3e-4)
    batch = observation.shape[0]

    def step(optimizer, objective, updater):
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
        updater.step()

    for k in range(steps):
        data = TensorDict({"observation": observation, "action": sample_action(batch)}, [batch])
        step(v_optim, loss.value_loss(data)[0], value_up)
        if k >= warmup and k % 2 == 0:
            step(a_optim, loss.actor_loss(data)[0], actor_up)


def assert_reductions_agree(loss, data, key: str, rows: int, seed: int):
    """``reduction="mean"`` and ``"sum"`` equal the mean and sum of ``"none"`` (``rows`` values)
    on the same random draws. Leaves the loss at ``"sum"``; returns the summed loss."""
    out = {}
    for reduction in ("mean", "none", "sum"):
        loss.reduction = reduction
        torch.manual_seed(seed)
        out[reduction] = loss(data)[key]
    assert out["none"].shape == (rows,)
    torch.testing.assert_close(out["none"].mean(), out["mean"])
    torch.testing.assert_close(out["none"].sum(), out["sum"])
    return out["sum"]


def make_loss_nan(monkeypatch, method: str) -> None:
    """Patch ``BDPOLoss.<method>`` (``qvalue_loss``, ``actor_loss``, ...) to return NaN."""
    from torchrl_bdpo.objectives import BDPOLoss

    real = getattr(BDPOLoss, method)

    def broken(self, td):
        value, meta = real(self, td)
        return value * float("nan"), meta

    monkeypatch.setattr(BDPOLoss, method, broken)
