import math

import pytest
import torch

from torchrl_bdpo.diffusion import NoiseSchedule, make_schedule


def test_vp_n5_matches_design_values():
    s = make_schedule("vp", 5)
    torch.testing.assert_close(s.betas[1:], torch.tensor([0.1959, 0.4588, 0.6358, 0.7549, 0.8350]), atol=1e-3, rtol=0)
    torch.testing.assert_close(s.kl_weights[1:], torch.tensor([0.622, 0.751, 1.037, 1.602, 2.547]), atol=1e-3, rtol=0)
    assert s.num_steps == 5
    assert s.betas[0] == 0 and s.alphas_cumprod[0] == 1 and s.kl_weights[0] == 0


def test_vp_formula_any_n():
    N = 50
    s = make_schedule("vp", N)
    n = torch.arange(1, N + 1, dtype=torch.float64)
    alpha = torch.exp(-0.1 / N - 0.5 * 9.9 * (2 * n - 1) / N**2)
    torch.testing.assert_close(s.alphas[1:].double(), alpha, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s.alphas_cumprod[1:].double(), torch.cumprod(alpha, 0), rtol=1e-5, atol=1e-7)
    # the chain ends close to N(0, I)
    assert s.alphas_cumprod[N] < 1e-2


def test_linear_and_cosine():
    lin = make_schedule("linear", 10)
    torch.testing.assert_close(lin.betas[1:], torch.linspace(1e-4, 2e-2, 10))
    cos = make_schedule("cosine", 10)
    t = torch.arange(11, dtype=torch.float64) / 10
    f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    abar = (f / f[0]).float()
    torch.testing.assert_close(cos.alphas_cumprod[1:10], abar[1:10], rtol=1e-5, atol=1e-6)
    assert cos.betas[10] == pytest.approx(0.999)


def test_reverse_mean_identities():
    s = make_schedule("vp", 5)
    a = torch.randn(7, 3)
    eps = torch.randn(7, 3)
    for n in range(1, 6):
        mu = s.reverse_mean(a, n, eps)
        # eps form of the DDPM mean
        eps_form = (a - s.betas[n] / (1 - s.alphas_cumprod[n]).sqrt() * eps) / s.alphas[n].sqrt()
        torch.testing.assert_close(mu, eps_form, rtol=1e-5, atol=1e-5)
    # at n = 1 the mean is the denoised action, and a reverse step adds no noise
    torch.testing.assert_close(s.reverse_mean(a, 1, eps), s.predict_x0(a, 1, eps))
    torch.testing.assert_close(s.reverse_step(a, 1, eps, torch.randn(7, 3)), s.predict_x0(a, 1, eps))
    # the forward noising inverts through predict_x0
    a0 = torch.rand(7, 3)
    n = torch.randint(1, 6, (7,))
    torch.testing.assert_close(s.predict_x0(s.q_sample(a0, n, eps), n, eps), a0, rtol=1e-4, atol=1e-4)


def test_clip_denoised():
    s = make_schedule("vp", 5)
    a = torch.full((4, 2), 5.0)
    x0 = s.predict_x0(a, 3, torch.zeros(4, 2), clip_denoised=True)
    assert x0.max() == 1.0


def test_posterior_sigma():
    s = make_schedule("vp", 5, sigma="posterior")
    b, ab = s.betas, s.alphas_cumprod
    for n in range(2, 6):
        assert s.sigmas[n] ** 2 == pytest.approx((b[n] * (1 - ab[n - 1]) / (1 - ab[n])).item(), rel=1e-5)
        w = b[n] ** 2 / (2 * (1 - b[n]) * (1 - ab[n]) * s.sigmas[n] ** 2)
        assert s.kl_weights[n] == pytest.approx(w.item(), rel=1e-5)
    assert s.noise_scales[1] == 0 and s.kl_weights[1] > 0


def test_step_kl_weights():
    s = make_schedule("vp", 5)
    e1, e2 = torch.randn(3, 2), torch.randn(3, 2)
    n = torch.tensor([1, 3, 5])
    expected = s.kl_weights[n] * ((e1 - e2) ** 2).sum(-1)
    torch.testing.assert_close(s.step_kl(e1, e2, n), expected)


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_bad_num_steps(n):
    with pytest.raises(ValueError, match="num_steps"):
        make_schedule("vp", n)


def test_unknown_name_and_sigma():
    with pytest.raises(ValueError, match="'sigmoid'.*expected one of"):
        make_schedule("sigmoid", 5)
    with pytest.raises(ValueError, match="sigma='fixed'"):
        make_schedule("vp", 5, sigma="fixed")
    with pytest.raises(ValueError, match="open interval"):
        NoiseSchedule(torch.tensor([0.1, 1.2]))


def test_compatibility():
    s = make_schedule("vp", 5)
    assert s.is_compatible(make_schedule("vp", 5))
    assert not s.is_compatible(make_schedule("vp", 6))
    assert not s.is_compatible(make_schedule("cosine", 5))
    assert not s.is_compatible(make_schedule("vp", 5, sigma="posterior"))


def test_final_noise():
    plain = make_schedule("vp", 5)
    noisy = make_schedule("vp", 5, final_noise=True)
    assert plain.noise_scales[1] == 0
    assert noisy.noise_scales[1] == pytest.approx(plain.betas[1].sqrt().item())
    torch.testing.assert_close(noisy.noise_scales[2:], plain.noise_scales[2:])
    torch.testing.assert_close(noisy.kl_weights, plain.kl_weights)
    a, eps, z = torch.randn(4, 2), torch.randn(4, 2), torch.randn(4, 2)
    torch.testing.assert_close(noisy.reverse_step(a, 1, eps, z), noisy.predict_x0(a, 1, eps) + plain.betas[1].sqrt() * z)


@pytest.mark.parametrize("shape,N", [((256,), 5), ((10,), 5), ((3,), 5), ((7,), 1), ((12,), 5), ((3, 4), 5), ((50,), 50)])
def test_stratified_steps_balance_the_counts_and_index_both_kinds_of_rows(shape, N):
    from torchrl_bdpo.diffusion import stratified_steps

    torch.manual_seed(0)
    R = math.prod(shape)
    per_step, extra = divmod(R, N)
    for _ in range(20):
        draw = stratified_steps(shape, N)
        steps = draw.steps
        assert steps.shape == torch.Size(shape) and steps.dtype == torch.long
        counts = torch.bincount(steps.reshape(-1), minlength=N + 1)
        assert counts[0] == 0 and counts.sum() == R
        assert sorted(counts[1:].tolist()) == [per_step] * (N - extra) + [per_step + 1] * extra
        flat = steps.reshape(-1)
        first, later = draw.first_rows.tolist(), draw.later_rows.tolist()
        assert len(first) == per_step + (extra > 0) and len(later) == R - per_step
        assert set(first) | set(later) == set(range(R)) and len(set(first) & set(later)) <= 1
        assert set(torch.nonzero(flat == 1).reshape(-1).tolist()) <= set(first)
        assert set(torch.nonzero(flat >= 2).reshape(-1).tolist()) <= set(later)


def test_stratified_steps_are_uniform_for_every_row():
    """Each row's step is U{1..N} (also for the steps that get the R % N extra rows): 30k draws of 7
    rows over 3 steps, every (row, step) frequency within 4.5 standard errors of 1/3."""
    from torchrl_bdpo.diffusion import stratified_steps

    torch.manual_seed(0)
    R, N, draws = 7, 3, 30000
    freq = torch.zeros(R, N + 1)
    for _ in range(draws):
        freq[torch.arange(R), stratified_steps((R,), N).steps] += 1
    freq = freq[:, 1:] / draws
    se = math.sqrt((1 / N) * (1 - 1 / N) / draws)
    assert (freq - 1 / N).abs().max() < 4.5 * se, freq


def test_stratified_steps_bad_num_steps():
    from torchrl_bdpo.diffusion import stratified_steps

    with pytest.raises(ValueError, match=r"num_steps=0: expected"):
        stratified_steps((4,), 0)


def test_noise_action_takes_given_steps_of_the_batch_shape_only():
    from torchrl_bdpo.diffusion import stratified_steps

    s = make_schedule("vp", 5)
    action = torch.rand(6, 3) * 2 - 1
    steps = stratified_steps((6,), 5).steps
    torch.manual_seed(0)
    a_n, n, eps = s.noise_action(action, steps)
    assert torch.equal(n, steps)
    torch.testing.assert_close(a_n, s.q_sample(action, steps, eps))
    with pytest.raises(ValueError, match=r"steps has shape \(1,\): expected the actions' batch shape \(6,\)"):
        s.noise_action(action, steps[:1])
