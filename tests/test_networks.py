import math

import pytest
import torch
from torch import nn

from torchrl_bdpo.diffusion import (
    DiffusionValueNetwork,
    EpsilonNetwork,
    QValueNetwork,
    SinusoidalTimestepEmbedding,
)


def test_sinusoidal_embedding_values():
    emb = SinusoidalTimestepEmbedding(64)
    out = emb(torch.tensor([0, 3]))
    assert out.shape == (2, 64)
    torch.testing.assert_close(out[0, :32], torch.zeros(32))
    torch.testing.assert_close(out[0, 32:], torch.ones(32))
    # first frequency is 1, last is 1e-4: raw integer steps, not rescaled
    assert out[1, 0] == pytest.approx(math.sin(3.0), abs=1e-6)
    assert out[1, 31] == pytest.approx(math.sin(3e-4), abs=1e-6)


def test_epsilon_network_architecture_and_init():
    net = EpsilonNetwork(3, 5)
    linears = [m for m in net.body if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears] == [256, 256, 256, 256, 3]
    assert linears[0].in_features == 3 + 64 + 5
    assert sum(isinstance(m, nn.Mish) for m in net.body) == 4
    w = linears[1].weight
    torch.testing.assert_close(w @ w.T, 2 * torch.eye(256), atol=1e-4, rtol=0)
    assert all((lin.bias == 0).all() for lin in linears)


@pytest.mark.parametrize("batch", [(), (4,), (2, 3)])
def test_network_batch_shapes(batch):
    net = EpsilonNetwork(2, 3, hidden=16)
    a, s = torch.randn(*batch, 2), torch.randn(*batch, 3)
    assert net(a, 2, s).shape == (*batch, 2)
    n = torch.randint(1, 6, batch)
    assert net(a, n, s).shape == (*batch, 2)
    v = DiffusionValueNetwork(3, 2, hidden=16)
    assert v(s, a, n).shape == (*batch, 1)
    assert any(isinstance(m, nn.LayerNorm) for m in v.body)
    q = QValueNetwork(3, 2, hidden=16)
    assert q(s, a).shape == (*batch, 1)


def test_network_bad_dims():
    net = EpsilonNetwork(2, 3, hidden=16)
    with pytest.raises(ValueError, match=r"action has shape \(4, 5\): expected a last dimension of 2"):
        net(torch.randn(4, 5), 1, torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"observation has shape \(4, 7\).*observation_dim"):
        net(torch.randn(4, 2), 1, torch.randn(4, 7))
    with pytest.raises(ValueError, match="observation is None"):
        net(torch.randn(4, 2), 1, None)
    with pytest.raises(ValueError, match="action_dim=0"):
        EpsilonNetwork(0, 3)
