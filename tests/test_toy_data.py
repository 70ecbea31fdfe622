import math

import pytest
import torch

from torchrl_bdpo.data import TOY_DATASETS, make_toy_buffer, make_toy_data, optimal_policy_weights, optimal_value, sample_optimal_policy
from torchrl_bdpo.data.toy import checkerboard_energy, ring_energy


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_structure(name):
    td = make_toy_data(name, 4000, seed=1)
    assert td.batch_size == (4000,)
    assert td["action"].shape == (4000, 2) and td["action"].dtype == torch.float32
    assert (td["observation"] == 0).all() and td["observation"].shape == (4000, 1)
    assert (td["next", "observation"] == 0).all()
    assert td["next", "reward"].shape == (4000, 1)
    assert td["next", "terminated"].all() and td["next", "done"].all() and not td["next", "truncated"].any()
    assert torch.isfinite(td["action"]).all()
    # seeded
    torch.testing.assert_close(make_toy_data(name, 4000, seed=1)["action"], td["action"])
    assert not torch.allclose(make_toy_data(name, 4000, seed=2)["action"], td["action"])


def test_swissroll_energy():
    td = make_toy_data("swissroll", 5000)
    a, r = td["action"], td["next", "reward"].squeeze(-1)
    torch.testing.assert_close(r, a.pow(2).sum(-1) / 9, rtol=1e-5, atol=1e-6)


def test_rings_energy_at_known_points():
    sq = torch.tensor([9.0, 8.5, 5.0625, 5.0, 2.25, 2.0, 0.5625])
    torch.testing.assert_close(ring_energy(sq), torch.tensor([0.667, 0.667, 0.333, 0.333, 1.0, 1.0, 0.0]))
    td = make_toy_data("rings", 8000)
    r = td["next", "reward"].squeeze(-1)
    radius = td["action"].norm(dim=-1)
    # the energy comes from the clean radius: each ring keeps its value despite the noise
    for rad, energy in ((3.0, 0.667), (2.25, 0.333), (1.5, 1.0), (0.75, 0.0)):
        near = (radius - rad).abs() < 0.2
        assert near.sum() > 1500
        assert torch.allclose(r[near], torch.full_like(r[near], energy))
    assert (r == 0.667).sum() == 2000  # equal counts


def test_moons_energy_is_label():
    td = make_toy_data("moons", 8000)
    a, r = td["action"], td["next", "reward"].squeeze(-1)
    assert set(r.unique().tolist()) == {0.0, 1.0} and (r == 1).sum() == 4000
    # undo the affine map: the outer moon (label 0) lies above the inner one on average
    x = (a - torch.tensor([-1.0, -0.2])) / 2
    assert x[r == 0, 1].mean() > 0.5 and x[r == 1, 1].mean() < 0


def test_eight_gaussians_energy_at_centres():
    td = make_toy_data("8gaussians", 8000)
    a, r = td["action"], td["next", "reward"].squeeze(-1)
    s = 1 / math.sqrt(2)
    centres = 4 * torch.tensor([(0, 1), (-s, s), (-1, 0), (-s, -s), (0, -1), (s, -s), (1, 0), (s, s)]) / 1.414
    for i, c in enumerate(centres):
        near = (a - c).norm(dim=-1) < 0.5
        assert near.sum() > 500
        assert torch.allclose(r[near], torch.full_like(r[near], i / 7))


def test_two_spirals_energy_range():
    td = make_toy_data("2spirals", 8000)
    a, r = td["action"], td["next", "reward"].squeeze(-1)
    assert r.min() >= 1 - 3 * math.pi / 10 - 1e-6 and r.max() <= 1
    # points near the centre have small t, hence high energy; the outer ends low energy
    centre, outer = a.norm(dim=-1) < 0.4, a.norm(dim=-1) > 2.8
    assert r[centre].mean() > 0.85 and r[outer].mean() < 0.2


def test_checkerboard_energy_at_known_points():
    c = torch.tensor([0.5, 2.0, 2.5, -1.0, -2.0, -3.0, 0.0])
    torch.testing.assert_close(checkerboard_energy(c), torch.tensor([1.0, 1, 0, 0, 1, 1, 0], dtype=torch.float64))
    td = make_toy_data("checkerboard", 8000)
    a = td["action"]
    assert a.abs().max() <= 4
    # occupied cells alternate: floor(x1) and floor(x2) (in half units) have the same parity
    cell = torch.floor(a / 2)
    assert (torch.remainder(cell[:, 0] + cell[:, 1], 2) == 0).all()


def test_buffer_samples_transitions():
    buffer = make_toy_buffer("moons", batch_size=64, num_points=1000)
    assert len(buffer) == 1000
    batch = buffer.sample()
    assert batch.batch_size == (64,)
    assert batch["next", "terminated"].all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_buffer_storage_device_keeps_every_transition(device):
    """The storage's device changes where the data live, never the data."""
    ref = make_toy_buffer("moons", batch_size=8, num_points=500, seed=3)[:]
    buffer = make_toy_buffer("moons", batch_size=8, num_points=500, seed=3, device=device)
    stored = buffer[:]
    # a storage on "cuda" holds its data on the current device, e.g. cuda:0 (!= torch.device("cuda"))
    where = torch.empty(0, device=device).device
    assert stored.device == where and buffer.sample().device == where
    assert (stored.cpu() == ref).all()


def test_optimal_policy_weights_and_samples():
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5])
    eta = 0.5
    w = optimal_policy_weights(rewards, eta)
    expected = torch.exp(rewards.double() / eta)
    torch.testing.assert_close(w, expected / expected.sum())
    assert optimal_value(rewards, eta) == pytest.approx(eta * math.log(expected.mean().item()))
    actions = torch.arange(4.0).unsqueeze(-1)
    draws = sample_optimal_policy(actions, rewards, eta, 200_000, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws.squeeze(-1).long(), minlength=4).double() / 200_000
    torch.testing.assert_close(freq, w, atol=5e-3, rtol=0)


def test_bad_input():
    with pytest.raises(ValueError, match="'spiral'.*expected one of"):
        make_toy_data("spiral")
    with pytest.raises(ValueError, match="num_points=0"):
        make_toy_data("moons", 0)
    with pytest.raises(ValueError, match="eta=0"):
        optimal_policy_weights(torch.ones(3), 0)
    with pytest.raises(ValueError, match="one reward per action"):
        sample_optimal_policy(torch.zeros(3, 2), torch.zeros(4), 1.0, 5)


@pytest.mark.parametrize("name", ["swissroll", "8gaussians", "checkerboard"])
def test_toy_energy_gives_every_point_its_stored_reward(name):
    from torchrl_bdpo.data import toy_energy

    data = make_toy_data(name, 20000, seed=3)
    stored = data["next", "reward"].squeeze(-1)
    energy = toy_energy(name)(data["action"])
    assert energy.shape == stored.shape and energy.dtype == stored.dtype
    # the stored rewards are computed in float64 and rounded; the points too
    torch.testing.assert_close(energy, stored, rtol=1e-6, atol=1e-6)
    assert stored.std() > 0


@pytest.mark.parametrize("name", ["rings", "moons", "2spirals", "nope"])
def test_toy_energy_of_other_datasets_is_a_clear_error(name):
    from torchrl_bdpo.data import toy_energy

    with pytest.raises(ValueError, match=f"dataset='{name}'"):
        toy_energy(name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_point_energies_eager_compiled_and_graphed_agree(device):
    """Every point energy gives the same values eager, compiled and (on a GPU) inside a CUDA
    graph, whose capture allows no copy from host memory: 8gaussians' centres are made on
    the first call at a (dtype, device), then reused. Bit for bit, except compiled on a GPU:
    a generated kernel may fuse swissroll's x0^2 + x1^2 into one multiply-add, a rounding
    apart (a few float32 ulps); the discrete energies (a centre's index / 7, 0 or 1) still
    agree exactly there."""
    from tensordict.nn import CudaGraphModule

    from torchrl_bdpo.data import toy, toy_energy

    points = make_toy_data("8gaussians", 512, seed=4)["action"].to(device)
    for name in ("swissroll", "8gaussians", "checkerboard"):
        energy = toy_energy(name)
        expected = energy(points)
        compiled = torch.compile(energy, fullgraph=True, dynamic=False)
        exact = device == "cpu" or name != "swissroll"
        tol = dict(rtol=0, atol=0) if exact else dict(rtol=4 * torch.finfo(torch.float32).eps, atol=0)
        torch.testing.assert_close(compiled(points), expected, **tol)
        if device == "cuda":
            graphed = CudaGraphModule(energy, warmup=2)
            for _ in range(4):  # warm-up calls, the capture, a replay
                out = graphed(points)
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
    first = toy._SCALED_CENTERS_AT[(torch.float32, points.device)]
    toy_energy("8gaussians")(points.double())
    toy_energy("8gaussians")(points)
    assert toy._SCALED_CENTERS_AT[(torch.float32, points.device)] is first
    assert first.device == points.device and (torch.float64, points.device) in toy._SCALED_CENTERS_AT
