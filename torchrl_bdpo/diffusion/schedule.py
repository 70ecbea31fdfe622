"""DDPM noise schedules over N discrete diffusion steps.

Every formula of docs/design.md section 2 lives here and only here: forward noising,
the reverse mean from a predicted epsilon, one reverse step, and the per-step
KL weights ``w_n``. Tensors are indexed by the step ``n`` itself: index 0 holds
the values of ``n = 0`` (``beta_0 = 0``, ``alphabar_0 = 1``), so ``buf[n]``
needs no offset anywhere.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from torchrl_bdpo._validation import check_num_steps

SCHEDULES = ("vp", "linear", "cosine")
SIGMAS = ("beta", "posterior")
STEP_SAMPLINGS = ("uniform", "stratified")


class StratifiedSteps(NamedTuple):
    """Diffusion steps drawn by :func:`stratified_steps`, with the rows that hold each kind.

    Attributes:
        steps: ``[*B]`` long, in ``1..N``.
        first_rows: flat row indices (into ``steps.reshape(-1)``) holding every row with step 1,
            and at most one other: ``R // N + (R % N > 0)`` of them for ``R`` rows.
        later_rows: flat row indices holding every row with step >= 2, and at most one with
            step 1: ``R - R // N`` of them.
    """

    steps: torch.Tensor
    first_rows: torch.Tensor
    later_rows: torch.Tensor


def stratified_steps(batch_shape, num_steps: int, device=None) -> StratifiedSteps:
    """Steps ``n`` in ``1..N`` for a batch: each row's ``n`` uniform, the batch's counts balanced.

    Each step is given to ``R // N`` of the ``R`` rows, and ``R % N`` steps drawn at random
    (without replacement) to one row more; the rows are assigned by a uniformly random
    permutation. So every row's step is ``U{1..N}`` as with i.i.d. draws (an unbiased estimate of
    the same loss: stratified sampling, as in Kingma et al. 2021's low-discrepancy time sampler),
    while the number of rows with step 1 is known before the draw: the rows that need one network
    and those that need another are index sets of fixed sizes, with no host read (CUDA graphs,
    static shapes). The draw is made on ``device`` (two ``rand`` calls and sorts), in float64 so
    that ties, which would favour lower row indices, have probability ~``R^2 2^-54``.
    """
    batch_shape = torch.Size(batch_shape)
    check_num_steps(num_steps)
    rows = batch_shape.numel()
    per_step, extra = divmod(rows, num_steps)
    counts = torch.full((num_steps,), per_step, dtype=torch.long, device=device)
    if extra:
        lucky = torch.argsort(torch.rand(num_steps, dtype=torch.float64, device=device))[:extra]
        counts = counts.index_fill(0, lucky, per_step + 1)
    position = torch.arange(rows, device=device)
    step_at = torch.searchsorted(counts.cumsum(0), position, right=True) + 1  # blocks of steps 1, 2, ...
    order = torch.argsort(torch.rand(rows, dtype=torch.float64, device=device))  # block position -> row
    steps = torch.empty_like(step_at).scatter(0, order, step_at)
    return StratifiedSteps(steps.reshape(batch_shape), order[: per_step + (extra > 0)], order[per_step:])


def _vp_betas(num_steps: int, b_min: float = 0.1, b_max: float = 10.0) -> torch.Tensor:
    n = torch.arange(1, num_steps + 1, dtype=torch.float64)
    alphas = torch.exp(-b_min / num_steps - 0.5 * (b_max - b_min) * (2 * n - 1) / num_steps**2)
    return 1 - alphas


def _linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def _cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def _check_num_steps(num_steps) -> int:
    return check_num_steps(num_steps, hint=" BDPO uses N=5 for locomotion and N=50 for the toy tasks.")


class NoiseSchedule(nn.Module):
    """A DDPM noise schedule: betas, alphas, alpha-bars, reverse-kernel sigmas and KL weights.

    The schedule holds no network. Samplers and losses ask it for coefficients.

    Args:
        betas (torch.Tensor): ``beta_1 .. beta_N``, each in ``(0, 1)``.

    Keyword Args:
        sigma (str): the reverse-kernel variance ``sigma_n^2``. ``"beta"`` (default,
            the reference implementation) uses ``beta_n``; ``"posterior"`` uses the
            true posterior variance ``beta_n (1 - abar_{n-1}) / (1 - abar_n)``. The
            posterior variance is 0 at ``n = 1``; the KL weight there uses the
            value of ``n = 2`` instead (DDPM's clipped log-variance), so the last
            step still counts in the path KL.
        name (str): a label, e.g. ``"vp"``.
        final_noise (bool): add ``sigma_1 z`` at the last step too. DDPM (and BDPO's
            reference) returns the denoised mean at ``n = 1``; the per-step KL
            nevertheless counts ``l_1`` with variance ``sigma_1^2``. Only with
            ``final_noise=True`` is ``sum_n l_n`` the exact KL between the two sampling
            processes, so that the regularized optimum is exactly ``nu exp(r / eta)``
            (up to what Gaussian kernels can represent). Defaults to ``False``.

    Attributes (buffers of length ``N + 1``, indexed by ``n``):
        betas, alphas, alphas_cumprod: ``beta_n``, ``alpha_n = 1 - beta_n``, ``abar_n``.
        sigmas: ``sigma_n``, the reverse-kernel standard deviation.
        noise_scales: ``[n > 1] sigma_n`` (``sigma_n`` for every ``n >= 1`` with
            ``final_noise``), the scale of the noise a reverse step adds.
        kl_weights: ``w_n`` with ``l_n = w_n ||eps_pi - eps_nu||^2``.

    Examples:
        >>> schedule = make_schedule("vp", 5)
        >>> schedule.betas[1:]
        tensor([0.1959, 0.4588, 0.6358, 0.7549, 0.8350])
        >>> schedule.kl_weights[1:]
        tensor([0.6218, 0.7505, 1.0372, 1.6020, 2.5472])
    """

    def __init__(self, betas: torch.Tensor, *, sigma: str = "beta", name: str = "custom", final_noise: bool = False) -> None:
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        _check_num_steps(betas.numel())
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(f"betas={betas.tolist()}: expected every beta_n in the open interval (0, 1).")
        if sigma not in SIGMAS:
            raise ValueError(f"sigma={sigma!r}: expected one of {SIGMAS}.")
        self.name = name
        self.sigma_type = sigma
        self.final_noise = final_noise
        n_steps = betas.numel()
        zero = betas.new_zeros(1)
        betas = torch.cat([zero, betas])
        alphas = 1 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        if sigma == "beta":
            var = betas.clone()
            kl_var = betas.clone()
        else:
            var = betas * (1 - abar_prev) / (1 - abar).clamp_min(1e-20)
            var[0] = 0
            kl_var = var.clone()
            kl_var[1] = var[2] if n_steps >= 2 else betas[1]
        kl_weights = torch.zeros_like(betas)
        kl_weights[1:] = betas[1:] ** 2 / (2 * alphas[1:] * (1 - abar[1:]) * kl_var[1:])
        noise_scales = var.sqrt()
        noise_scales[0] = 0
        noise_scales[1] = kl_var[1].sqrt() if final_noise else 0

        def reg(name, value):
            self.register_buffer(name, value.to(torch.get_default_dtype()))

        reg("betas", betas)
        reg("alphas", alphas)
        reg("alphas_cumprod", abar)
        reg("alphas_cumprod_prev", abar_prev)
        reg("sigmas", var.sqrt())
        reg("kl_sigmas", kl_var.sqrt())
        reg("noise_scales", noise_scales)
        reg("kl_weights", kl_weights)
        reg("sqrt_alphas_cumprod", abar.sqrt())
        reg("sqrt_one_minus_alphas_cumprod", (1 - abar).sqrt())
        # posterior mean mu_n = coef_x0 * x0_hat + coef_xt * a^n
        coef_x0 = torch.zeros_like(betas)
        coef_xt = torch.zeros_like(betas)
        coef_x0[1:] = abar_prev[1:].sqrt() * betas[1:] / (1 - abar[1:])
        coef_xt[1:] = alphas[1:].sqrt() * (1 - abar_prev[1:]) / (1 - abar[1:])
        reg("posterior_mean_coef_x0", coef_x0)
        reg("posterior_mean_coef_xt", coef_xt)

    @property
    def num_steps(self) -> int:
        """N, the number of diffusion steps."""
        return self.betas.numel() - 1

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_steps={self.num_steps}, sigma={self.sigma_type!r}, final_noise={self.final_noise}"

    def is_compatible(self, other: "NoiseSchedule") -> bool:
        """Whether ``other`` has the same N, betas and sigma choice (so per-step KLs are defined)."""
        return (
            isinstance(other, NoiseSchedule)
            and other.num_steps == self.num_steps
            and other.sigma_type == self.sigma_type
            and torch.allclose(other.betas.cpu(), self.betas.cpu(), rtol=1e-6, atol=1e-8)
        )

    def describe(self) -> str:
        betas = [round(b, 4) for b in self.betas[1:].tolist()]
        if len(betas) > 6:
            betas = betas[:3] + ["..."] + betas[-2:]
        return f"{self.name}(N={self.num_steps}, sigma={self.sigma_type!r}, betas={betas})"

    @staticmethod
    def _gather(buf: torch.Tensor, n, like: torch.Tensor) -> torch.Tensor:
        """``buf[n]`` shaped to broadcast against ``like`` (``[..., action_dim]``)."""
        if isinstance(n, int):
            return buf[n]
        return buf[n].unsqueeze(-1)

    def q_sample(self, action: torch.Tensor, n, noise: torch.Tensor) -> torch.Tensor:
        """Forward noising ``a^n = sqrt(abar_n) a + sqrt(1 - abar_n) eps``."""
        return self._gather(self.sqrt_alphas_cumprod, n, action) * action + self._gather(self.sqrt_one_minus_alphas_cumprod, n, action) * noise

    def noise_action(self, action: torch.Tensor, steps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw ``n ~ U{1..N}`` per sample (or take ``steps``, e.g. from :func:`stratified_steps`)
        and ``eps ~ N(0, I)``; return ``(a^n, n, eps)``."""
        if steps is not None and steps.shape != action.shape[:-1]:
            raise ValueError(
                f"steps has shape {tuple(steps.shape)}: expected the actions' batch shape "
                f"{tuple(action.shape[:-1])}, one step per action (a broadcast would give rows one "
                f"shared step). Pass stratified_steps(action.shape[:-1], N).steps, or steps=None."
            )
        n = torch.randint(1, self.num_steps + 1, action.shape[:-1], device=action.device) if steps is None else steps
        noise = torch.randn_like(action)
        return self.q_sample(action, n, noise), n, noise

    def predict_x0(self, action_n: torch.Tensor, n, eps: torch.Tensor, clip_denoised: bool = False) -> torch.Tensor:
        """``x0_hat = (a^n - sqrt(1 - abar_n) eps) / sqrt(abar_n)``, clipped to [-1, 1] on request."""
        x0 = (action_n - self._gather(self.sqrt_one_minus_alphas_cumprod, n, action_n) * eps) / self._gather(self.sqrt_alphas_cumprod, n, action_n)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        return x0

    def reverse_mean(self, action_n: torch.Tensor, n, eps: torch.Tensor, clip_denoised: bool = False) -> torch.Tensor:
        """The reverse-kernel mean ``mu_n(a^n, eps)`` (equal to ``x0_hat`` at ``n = 1``)."""
        x0 = self.predict_x0(action_n, n, eps, clip_denoised)
        return self._gather(self.posterior_mean_coef_x0, n, action_n) * x0 + self._gather(self.posterior_mean_coef_xt, n, action_n) * action_n

    def reverse_step(self, action_n: torch.Tensor, n, eps: torch.Tensor, noise: torch.Tensor, clip_denoised: bool = False) -> torch.Tensor:
        """``a^{n-1} = mu_n + [n > 1 or final_noise] sigma_n z`` for the standard normal draw ``noise``."""
        return self.reverse_mean(action_n, n, eps, clip_denoised) + self._gather(self.noise_scales, n, action_n) * noise

    def step_kl(self, eps_policy: torch.Tensor, eps_reference: torch.Tensor, n) -> torch.Tensor:
        """``l_n = w_n ||eps_pi - eps_nu||^2``, summed over the last (action) dimension."""
        w = self.kl_weights[n]
        return w * (eps_policy - eps_reference).pow(2).sum(-1)


def make_schedule(name: str, num_steps: int, *, sigma: str = "beta", final_noise: bool = False, **kwargs) -> NoiseSchedule:
    """Build a :class:`NoiseSchedule` by name.

    Args:
        name (str): ``"vp"`` (the variance-preserving schedule of the reference
            implementation, ``b_min=0.1, b_max=10``), ``"linear"`` (DDPM's linear betas,
            ``beta_start=1e-4, beta_end=2e-2`` unless given) or ``"cosine"``
            (Nichol & Dhariwal, ``s=0.008``, betas capped at 0.999).
        num_steps (int): N >= 1.

    Keyword Args:
        sigma (str): ``"beta"`` or ``"posterior"``, see :class:`NoiseSchedule`.
        final_noise (bool): noise at the last step too, see :class:`NoiseSchedule`.
        **kwargs: passed to the beta formula (``b_min``/``b_max`` for vp,
            ``beta_start``/``beta_end`` for linear, ``s``/``max_beta`` for cosine).
    """
    builders = {"vp": _vp_betas, "linear": _linear_betas, "cosine": _cosine_betas}
    if name not in builders:
        raise ValueError(f"schedule name={name!r}: expected one of {SCHEDULES}. 'vp' is the one BDPO's reference implementation uses.")
    _check_num_steps(num_steps)
    return NoiseSchedule(builders[name](num_steps, **kwargs), sigma=sigma, name=name, final_noise=final_noise)
