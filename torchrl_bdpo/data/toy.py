"""The paper's six synthetic 2D bandits (one state, terminal after one step).

Each dataset is a set of transitions with ``observation = zeros(1)``, ``action`` the 2D
point and ``("next", "reward")`` its energy; every transition is terminal. For such a
bandit the regularized optimum is known exactly: ``pi*(a) ∝ nu(a) exp(r(a) / eta)``,
with value ``eta * log E_nu[exp(r / eta)]``. :func:`sample_optimal_policy` draws from it
by weighted resampling of the data.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.data.replay_buffers.samplers import RandomSampler

TOY_DATASETS = ("swissroll", "rings", "moons", "8gaussians", "2spirals", "checkerboard")


def _uniform(n, g, *shape):
    return torch.rand(n, *shape, generator=g, dtype=torch.float64)


def _normal(n, g, *shape):
    return torch.randn(n, *shape, generator=g, dtype=torch.float64)


def swissroll(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """3D swiss roll with noise 1.0, coordinates 0 and 2, divided by 5; energy ``|x|^2 / 9``."""
    t = 1.5 * math.pi * (1 + 2 * _uniform(n, g))
    height = 21 * _uniform(n, g)
    xyz = torch.stack([t * torch.cos(t), height, t * torch.sin(t)], -1) + _normal(n, g, 3)
    x = xyz[:, [0, 2]] / 5.0
    return x, _swissroll_energy(x)


def _swissroll_energy(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).sum(-1) / 9.0


def ring_energy(sq_radius: torch.Tensor) -> torch.Tensor:
    """The rings energy of a clean squared radius."""
    return torch.where(
        sq_radius >= 8.5,
        torch.full_like(sq_radius, 0.667),
        torch.where(
            sq_radius >= 5.0, torch.full_like(sq_radius, 0.333), torch.where(sq_radius >= 2.0, torch.ones_like(sq_radius), torch.zeros_like(sq_radius))
        ),
    )


def rings(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Four circles of radius 3, 2.25, 1.5, 0.75 (equal counts); noise std 0.08 added after the energy."""
    radii = torch.tensor([3.0, 2.25, 1.5, 0.75], dtype=torch.float64)
    ring = torch.arange(n) % 4
    ring = ring[torch.randperm(n, generator=g)]
    angle = 2 * math.pi * _uniform(n, g)
    r = radii[ring]
    clean = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], -1)
    energy = ring_energy(clean.pow(2).sum(-1))
    return clean + 0.08 * _normal(n, g, 2), energy


def moons(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two moons with noise 0.1, times 2, plus (-1, -0.2); energy = the moon's label."""
    label = (torch.arange(n) % 2)[torch.randperm(n, generator=g)].to(torch.float64)
    t = math.pi * _uniform(n, g)
    outer = torch.stack([torch.cos(t), torch.sin(t)], -1)
    inner = torch.stack([1 - torch.cos(t), 1 - torch.sin(t) - 0.5], -1)
    x = torch.where(label.unsqueeze(-1) > 0, inner, outer) + 0.1 * _normal(n, g, 2)
    x = 2 * x + torch.tensor([-1.0, -0.2], dtype=torch.float64)
    return x, label


EIGHT_GAUSSIAN_CENTERS = (
    (0.0, 1.0),
    (-1 / math.sqrt(2), 1 / math.sqrt(2)),
    (-1.0, 0.0),
    (-1 / math.sqrt(2), -1 / math.sqrt(2)),
    (0.0, -1.0),
    (1 / math.sqrt(2), -1 / math.sqrt(2)),
    (1.0, 0.0),
    (1 / math.sqrt(2), 1 / math.sqrt(2)),
)


def eight_gaussians(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres at radius 4 in the listed order, N(0, 0.5^2) noise, all / 1.414; energy = nearest centre / 7."""
    idx = torch.randint(0, 8, (n,), generator=g)
    x = (_EIGHT_GAUSSIAN_RADIUS_4_CENTERS[idx] + 0.5 * _normal(n, g, 2)) / 1.414
    return x, _eight_gaussians_energy(x)


_EIGHT_GAUSSIAN_RADIUS_4_CENTERS = 4.0 * torch.tensor(EIGHT_GAUSSIAN_CENTERS, dtype=torch.float64)
_EIGHT_GAUSSIAN_SCALED_CENTERS = _EIGHT_GAUSSIAN_RADIUS_4_CENTERS / 1.414
# the centres per (dtype, device), made on the first call there: a later call (e.g. inside a CUDA
# graph's capture, where a copy from host memory is not allowed) copies nothing
_SCALED_CENTERS_AT: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _eight_gaussians_energy(x: torch.Tensor) -> torch.Tensor:
    """The index of the nearest (scaled) centre, / 7."""
    if torch.compiler.is_compiling():  # a constant of the compiled graph, on its device
        centers = _EIGHT_GAUSSIAN_SCALED_CENTERS.to(dtype=x.dtype, device=x.device)
    else:
        centers = _SCALED_CENTERS_AT.get((x.dtype, x.device))
        if centers is None:
            centers = _EIGHT_GAUSSIAN_SCALED_CENTERS.to(dtype=x.dtype, device=x.device)
            _SCALED_CENTERS_AT[(x.dtype, x.device)] = centers
    return torch.cdist(x.reshape(-1, 2), centers).argmin(-1).reshape(x.shape[:-1]).to(x.dtype) / 7.0


def two_spirals(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """t = sqrt(U) 3 pi; arms ``±(-cos t t + 0.5 U1, sin t t + 0.5 U2)``; / 3, + N(0, 0.1^2); energy clip(1 - t/10)."""
    t = torch.sqrt(_uniform(n, g)) * 3 * math.pi
    arm = torch.stack([-torch.cos(t) * t + 0.5 * _uniform(n, g), torch.sin(t) * t + 0.5 * _uniform(n, g)], -1)
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(torch.float64)
    sign = sign[torch.randperm(n, generator=g)]
    x = sign.unsqueeze(-1) * arm / 3.0 + 0.1 * _normal(n, g, 2)
    return x, (1 - t / 10).clamp(0, 1)


def checkerboard_energy(first: torch.Tensor) -> torch.Tensor:
    """1 where the first coordinate c has 0 < c <= 2 or c <= -2, else 0."""
    return (((first > 0) & (first <= 2)) | (first <= -2)).to(torch.float64)


def checkerboard(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x1 ~ U[-2, 2]; x2 = U[0, 1) - 2 Bernoulli(0.5) + (floor(x1) mod 2); point 2 (x1, x2)."""
    x1 = 4 * _uniform(n, g) - 2
    x2 = _uniform(n, g) - 2 * torch.randint(0, 2, (n,), generator=g).to(torch.float64)
    x2 = x2 + torch.remainder(torch.floor(x1), 2)
    x = 2 * torch.stack([x1, x2], -1)
    return x, checkerboard_energy(x[:, 0])


_GENERATORS: dict[str, Callable] = {
    "swissroll": swissroll,
    "rings": rings,
    "moons": moons,
    "8gaussians": eight_gaussians,
    "2spirals": two_spirals,
    "checkerboard": checkerboard,
}


# the energies that are a function of the point; the generators above use the same functions
_POINT_ENERGIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "swissroll": _swissroll_energy,
    "8gaussians": _eight_gaussians_energy,
    "checkerboard": lambda x: checkerboard_energy(x[..., 0]).to(x.dtype),
}


def toy_energy(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The energy of a toy dataset as a function of the point, ``[..., 2] -> [...]``.

    It gives every stored point its stored reward; a known reward (a parameter-free Q) for
    separating a critic's error from the rest of an algorithm. Only the datasets whose energy
    is a function of the point have one: rings (its energy is that of the ring before the
    noise), moons and 2spirals (a latent label) raise a ``ValueError``.
    """
    if name not in _GENERATORS:
        raise ValueError(f"dataset={name!r}: expected one of {TOY_DATASETS}.")
    energy = _POINT_ENERGIES.get(name)
    if energy is None:
        why = "it depends on the clean ring or a latent label"
        raise ValueError(f"dataset={name!r} has no energy as a function of the point ({why}): expected one of {tuple(_POINT_ENERGIES)}.")
    return energy


def make_toy_data(name: str, num_points: int = 1_000_000, seed: int = 0) -> TensorDict:
    """The transitions of a toy bandit as a TensorDict of batch size ``[num_points]``.

    Keys: ``observation`` (zeros, 1 dim), ``action`` (the 2D point), and under ``"next"``:
    ``observation`` (zeros), ``reward`` (the energy, ``[n, 1]``), ``terminated`` and
    ``done`` (True), ``truncated`` (False). float32; seeded.
    """
    if name not in _GENERATORS:
        raise ValueError(f"toy dataset {name!r}: expected one of {TOY_DATASETS}.")
    if not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"num_points={num_points!r}: expected a positive integer.")
    g = torch.Generator().manual_seed(seed)
    action, energy = _GENERATORS[name](num_points, g)
    n = num_points
    ones = torch.ones(n, 1, dtype=torch.bool)
    return TensorDict(
        {
            "observation": torch.zeros(n, 1),
            "action": action.float(),
            "next": {
                "observation": torch.zeros(n, 1),
                "reward": energy.float().unsqueeze(-1),
                "terminated": ones,
                "done": ones.clone(),
                "truncated": torch.zeros(n, 1, dtype=torch.bool),
            },
        },
        batch_size=[n],
    )


def make_toy_buffer(name: str, batch_size: int, num_points: int = 1_000_000, seed: int = 0, *, device: str | torch.device = "cpu") -> TensorDictReplayBuffer:
    """A ``TensorDictReplayBuffer`` over :func:`make_toy_data`, sampling ``batch_size`` transitions.

    ``device``: the storage's (the data are drawn on the CPU, the same for every device).
    """
    data = make_toy_data(name, num_points, seed)
    buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(num_points, device=device), sampler=RandomSampler(), batch_size=batch_size)
    buffer.extend(data)
    return buffer


def optimal_policy_weights(rewards: torch.Tensor, eta: float) -> torch.Tensor:
    """Normalised weights ``exp(r / eta) / sum exp(r / eta)`` of the data under ``pi*``."""
    if not eta > 0:
        raise ValueError(f"eta={eta!r}: expected a positive temperature.")
    return torch.softmax(rewards.reshape(-1).double() / eta, 0)


def optimal_value(rewards: torch.Tensor, eta: float) -> float:
    """``eta * log E_nu[exp(r / eta)]``, the value of ``pi*`` for the regularized bandit."""
    r = rewards.reshape(-1).double()
    return float(eta * (torch.logsumexp(r / eta, 0) - math.log(r.numel())))


def sample_optimal_policy(actions: torch.Tensor, rewards: torch.Tensor, eta: float, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``num_samples`` actions of ``pi* ∝ nu exp(r / eta)`` by weighted resampling of the data."""
    if actions.shape[0] != rewards.reshape(-1).shape[0]:
        raise ValueError(f"{actions.shape[0]} actions but {rewards.reshape(-1).shape[0]} rewards: expected one reward per action.")
    w = optimal_policy_weights(rewards, eta)
    idx = torch.multinomial(w, num_samples, replacement=True, generator=generator)
    return actions[idx]
