"""Starting the actor at the reference: a fit of the actor's eps to the reference's along its paths.

Online BDPO (uniform reference) starts from a freshly initialised eps network. Such a network
predicts eps near zero, so its reverse chain pushes the denoised action to the box's faces:
on a 3-dimensional action about half the components land within 0.01 of -1 or 1 (docs/design.md
section 5). Offline BDPO hands over from pretraining with
:meth:`~torchrl_bdpo.objectives.BDPOLoss.init_actor_from_behavior`, a copy; an analytic
reference has no parameters to copy, so :func:`fit_actor_to_reference` fits them instead.

The fit minimises the path KL in the reference's direction, along the reference's own reverse
chains: ``E_{a^{0:N} ~ nu} sum_n l_n(s, a^n)`` with ``l_n = w_n ||eps_pi - eps_nu||^2``
(docs/design.md section 2). It is zero exactly when the actor's eps equals the reference's
wherever the reference's chains go, so the actor then samples the reference's paths.
"""

from __future__ import annotations

import torch

from torchrl_bdpo.objectives.denoising import predict_eps_with
from torchrl_bdpo.objectives.pathwise_kl import path_step_inputs

__all__ = ["fit_actor_to_reference", "reference_path_kl"]


def _check_observations(observation) -> None:
    if not isinstance(observation, torch.Tensor) or observation.ndim != 2 or observation.shape[0] == 0:
        shape = tuple(observation.shape) if isinstance(observation, torch.Tensor) else type(observation).__name__
        raise ValueError(f"observation: {shape}: expected a [num_states, observation_dim] tensor of states to fit at (e.g. the replay's observations).")


def reference_path_kl(loss, observation: torch.Tensor) -> torch.Tensor:
    """``sum_n l_n`` along one reference path per row of ``observation``: ``[B]``, gradients to the actor.

    The reference (``loss.behavior_network`` under its target parameters, the KL reference BDPO
    uses) samples the paths without gradients; the actor's eps is evaluated at their ``a^n``.
    """
    actor, reference = loss.actor_network, loss.behavior_network
    with torch.no_grad():
        with loss.target_behavior_network_params.to_module(reference, preserve_module_state=False):
            path = reference.sample_path(observation)
    action_n, steps, obs = path_step_inputs(observation, path)  # a^n, n, s for n = 1..N
    eps_pi = predict_eps_with(actor, loss.actor_network_params, action_n, steps, obs)
    return actor.schedule.step_kl(eps_pi, path.eps.detach(), steps).sum(0)


def fit_actor_to_reference(
    loss, observation: torch.Tensor, *, steps: int = 2000, batch_size: int = 256, lr: float = 3e-4, generator: torch.Generator | None = None
) -> dict:
    """Fit ``loss``'s actor to its reference, then copy it to the target actor.

    Args:
        loss: a :class:`~torchrl_bdpo.objectives.BDPOLoss` (or any loss with ``actor_network``,
            ``behavior_network`` and their ``*_params``, the reference's as
            ``target_behavior_network_params``).
        observation (Tensor): ``[num_states, observation_dim]``, the states to fit at (batches
            of ``batch_size`` are drawn from them with replacement).

    Keyword Args:
        steps (int): Adam steps. Defaults to 2000.
        batch_size (int): states per step (one reference path each). Defaults to 256.
        lr (float): Adam's learning rate; the optimizer is this function's own, so the run's
            optimizers' state is untouched. Defaults to 3e-4.
        generator (torch.Generator, optional): draws the batches' rows.

    Returns:
        ``{"kl_start", "kl_end"}``: the mean reference-direction path KL (nats) on one batch
        of ``batch_size`` states before and after the fit, with the same reference paths.
    """
    _check_observations(observation)
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name}={value!r}: expected a positive int.")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr={lr!r}: expected a positive learning rate.")
    params = loss.actor_network_params
    leaves = [p for p in params.values(True, True) if p.requires_grad]
    if not leaves:
        raise ValueError("fit_actor_to_reference: the actor has no trainable parameters.")
    device = observation.device

    def draw_rows() -> torch.Tensor:
        rows = torch.randint(0, observation.shape[0], (batch_size,), generator=generator, device=device if generator is None else generator.device)
        return rows.to(device)

    probe_rows = draw_rows()

    def probe() -> float:
        # the same reference paths before and after: a forked RNG with a fixed seed
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            return float(reference_path_kl(loss, observation[probe_rows]).mean())

    kl_start = probe()
    optimizer = torch.optim.Adam(leaves, lr=lr)
    for _ in range(steps):
        value = reference_path_kl(loss, observation[draw_rows()]).mean()
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
    with torch.no_grad():
        loss.target_actor_network_params.data.copy_(params.data)
    return {"kl_start": kl_start, "kl_end": probe()}
