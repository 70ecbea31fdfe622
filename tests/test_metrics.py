import math

import pytest
import torch

from torchrl_bdpo.metrics import knn_entropy


@pytest.mark.parametrize("dim", [1, 3])
def test_knn_entropy_of_the_uniform_box_and_a_gaussian(dim):
    g = torch.Generator().manual_seed(0)
    box = torch.rand(4000, dim, generator=g) * 2 - 1  # U[-1, 1]^d: d log 2
    assert knn_entropy(box).item() == pytest.approx(dim * math.log(2), abs=0.05 * dim)
    std = 0.1
    gauss = torch.randn(4000, dim, generator=g) * std  # d (log(2 pi e) / 2 + log std)
    assert knn_entropy(gauss).item() == pytest.approx(dim * (0.5 * math.log(2 * math.pi * math.e) + math.log(std)), abs=0.05 * dim)


def test_knn_entropy_falls_without_bound_for_mass_on_a_face():
    """Clipped actions: a share of the samples on a face of the box has no density in 3D; the
    estimate keeps falling as the sample grows, which is why reports give the share at the edge."""
    g = torch.Generator().manual_seed(1)

    def clipped(n):  # two free coordinates, the third clipped: a fifth of the mass on two faces
        return torch.cat([torch.rand(n, 2, generator=g) * 2 - 1, (torch.randn(n, 1, generator=g) * 0.8).clamp(-1, 1)], -1)

    small, large = knn_entropy(clipped(250)), knn_entropy(clipped(4000))
    assert large < small - 0.1  # ~0.3 expected: 0.2 of the mass at dimension 2 instead of 3


def test_knn_entropy_refuses_atoms_and_bad_shapes():
    x = torch.zeros(100, 2)
    with pytest.raises(ValueError, match="exact copies"):
        knn_entropy(x)
    with pytest.raises(ValueError, match="num_samples, dim"):
        knn_entropy(torch.randn(10))
    with pytest.raises(ValueError, match="1 <= k < num_samples"):
        knn_entropy(torch.randn(5, 2), k=5)
