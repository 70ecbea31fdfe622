"""Phase A's compiled behavior step as one function of tensors: loss, gradients and clip."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from torchrl_bdpo.speed.compile import accelerate


class _EpsCall(nn.Module):
    """``actor.predict_eps`` as a module's forward, for :func:`torch.func.functional_call`."""

    def __init__(self, actor) -> None:
        super().__init__()
        self.actor = actor

    def forward(self, action_n, n, observation):
        return self.actor.predict_eps(action_n, n, observation)


class BehaviorProgram:
    """The behavior step's loss, gradients and gradient clip as one compiled function of tensors.

    ``BDPOUpdate(compile=True)`` on a CPU runs :attr:`BDPOUpdate.behavior` (phase A, pretraining)
    through this: :func:`torch.func.grad_and_value` of :meth:`BDPOLoss.behavior_loss`'s objective
    over the parameters, then the global-norm clip, traced into one graph (forward, backward and
    clip, the way an XLA program holds a JAX step), after which the optimizer and the target
    EMA run as usual on the gradients it returns. Against the compiled loss method followed by
    autograd's backward and ``clip_grad_norm_``, this removes most of a step's fixed cost (the
    loss's TensorDict guards, the autograd engine's walk, the clip's per-tensor calls): 1.14-1.16x the
    pretraining steps/s on a 2-core CPU (docs/performance.md). The random draws (``n``,
    ``eps``) are made eagerly before the call, in the loss's order; the numbers are eager's to
    float rounding. Batches carrying a loss mask take the regular step (:meth:`accepts`).

    Args:
        loss: the BDPO loss (its ``behavior_network``, ``behavior_network_params``, ``reduction``).
        params (list): the behavior optimizer's parameters, those of ``behavior_network_params``.
        grad_clip (float or None): the global-norm clip.
        compile_kwargs (dict): ``torch.compile`` keyword arguments.
        error (callable): the per-sample denoising error of ``(eps_hat, eps)``
            (:func:`torchrl_bdpo.objectives.denoising.eps_error`).
    """

    def __init__(self, loss, params: list, grad_clip, compile_kwargs: dict, *, error: Callable) -> None:
        self.loss = loss
        self.error = error
        self.params = params
        self.grad_clip = grad_clip
        self.call = _EpsCall(loss.behavior_network)
        by_id = {id(p): i for i, p in enumerate(params)}
        names, self.const_keys, self.const_names = [None] * len(params), [], []
        for key, value in loss.behavior_network_params.items(include_nested=True, leaves_only=True):
            name = "actor." + (".".join(key) if isinstance(key, tuple) else key)
            if id(value) in by_id:
                names[by_id[id(value)]] = name
            else:  # buffers: inputs, not differentiated
                self.const_keys.append(key)
                self.const_names.append(name)
        if None in names:
            raise RuntimeError(
                "BDPOUpdate: the behavior optimizer's parameters are not the loss's "
                "behavior_network_params; build the optimizers from BDPOUpdate.param_groups(loss)."
            )
        self.names = names
        self._consts = None  # (loss._params_version, tensors)
        self.fn = accelerate(self._grads, compile=True, dynamic=False, name="behavior step (functional)", **compile_kwargs)

    def accepts(self, batch) -> bool:
        """A batch with a loss-mask entry takes the regular step (``LossModule._reduce_loss`` reads it)."""
        return all(batch.get(key, default=None) is None for key in self.loss._loss_mask_keys())

    def _constants(self) -> list:
        version = getattr(self.loss, "_params_version", None)
        if self._consts is None or version is None or self._consts[0] != version:
            td = self.loss.behavior_network_params
            self._consts = (version, [td.get(key) for key in self.const_keys])
        return self._consts[1]

    def _grads(self, params, constants, action_n, n, noise, observation):
        names, const_names, call, error = self.names, self.const_names, self.call, self.error
        reduction = self.loss.reduction

        def objective(trainable):
            values = dict(zip(names, trainable))
            values.update(zip(const_names, constants))
            err = error(torch.func.functional_call(call, values, (action_n, n, observation)), noise)
            return err.mean() if reduction == "mean" else err.sum()

        grads, value = torch.func.grad_and_value(objective)([p.detach() for p in params])
        norm = None
        if self.grad_clip:  # torch.nn.utils.clip_grad_norm_'s arithmetic
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            coef = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            grads = [g * coef for g in grads]
        return value, grads, norm

    def set_grads(self, batch) -> dict:
        """Draw, run the program, and leave the clipped gradients in the parameters' ``.grad``;
        returns the step's outputs (``loss_behavior``, and ``grad_norm_behavior`` when clipping)."""
        # no finiteness check (a host sync), as in the compiled loss methods: validate the data first
        loss, keys = self.loss, self.loss.tensor_keys
        observation, action = batch.get(keys.observation), batch.get(keys.action)
        action_n, n, noise = loss.behavior_network.schedule.noise_action(action)
        value, grads, norm = self.fn(self.params, self._constants(), action_n, n, noise, observation)
        for p, g in zip(self.params, grads):
            p.grad = g
        out = {"loss_behavior": value.detach()}
        if norm is not None:
            out["grad_norm_behavior"] = norm
        return out
