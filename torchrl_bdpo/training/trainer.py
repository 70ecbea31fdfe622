"""BDPO under ``torchrl.trainers.Trainer``: an optimization stepper with BDPO's cadence.

torchrl's default stepper sums every ``loss_*`` entry into one backward pass for one optimizer
and averages a fixed set of keys over the optimization steps of a batch. BDPO trains the
critics every step and the actor (with the behavior) every ``actor_every``-th step after a
warm-up, each group with its own optimizer, gradient clip and target EMA: what
:class:`~torchrl_bdpo.training.BDPOUpdate` does. :class:`BDPOOptimizationStepper` hands each
of the trainer's sub-batches to it and reports the same keys on every step.
"""

from __future__ import annotations

import math

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.trainers import OptimizationStepper


class BDPOOptimizationStepper(OptimizationStepper):
    """The trainer's optimization step for BDPO: critics every step, actor on its cadence.

    Args:
        update (BDPOUpdate): the optimizer steps (its optimizers, clips and target updaters).

    Keyword Args:
        warmup (int): critic-only steps before the first actor step. Defaults to 0.
        actor_every (int): an actor (and behavior) step every ``actor_every``-th step after the
            warm-up, as the scripts' ``optim.actor_every``. Defaults to 5.
        schedulers (dict, optional): ``{"critic": ..., "actor": ...}`` learning-rate schedulers,
            stepped after their group's optimizer step.

    Each :meth:`step` returns the same keys, so the trainer can average and log them:
    ``loss_qvalue``, ``loss_value``, ``loss_actor`` and ``loss_behavior`` (the last actor step's
    values; NaN before the first one), and ``actor_step`` (1.0 when this step trained the
    actor). Pass ``optimizer=None`` to the trainer: the stepper owns the optimizers.

    Examples:
        >>> # trainer = Trainer(collector=collector, total_frames=..., frame_skip=1,
        >>> #     optim_steps_per_batch=64, loss_module=loss, optimizer=None,
        >>> #     optimization_stepper=BDPOOptimizationStepper(update, warmup=1000, actor_every=5))
    """

    KEYS = ("loss_qvalue", "loss_value", "loss_actor", "loss_behavior", "actor_step")

    def __init__(self, update, *, warmup: int = 0, actor_every: int = 5, schedulers: dict | None = None) -> None:
        for name, value, low in (("warmup", warmup, 0), ("actor_every", actor_every, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r}: expected an integer >= {low}.")
        self.update = update
        self.warmup = warmup
        self.actor_every = actor_every
        self.schedulers = schedulers or {}
        self.steps = 0
        self.actor_steps = 0
        self._last_actor = {"loss_actor": math.nan, "loss_behavior": math.nan}

    def is_actor_step(self, step: int) -> bool:
        return step >= self.warmup and (step - self.warmup) % self.actor_every == 0

    def step(self, trainer, sub_batch: TensorDictBase) -> TensorDictBase:
        critic = self.update.critic(sub_batch)
        if "critic" in self.schedulers:
            self.schedulers["critic"].step()
        actor_step = self.is_actor_step(self.steps)
        if actor_step:
            policy = self.update.policy(sub_batch)
            if "actor" in self.schedulers:
                self.schedulers["actor"].step()
            for key in self._last_actor:
                if key in policy.keys():
                    self._last_actor[key] = float(policy[key])
            self.actor_steps += 1
        self.steps += 1
        values = {"loss_qvalue": float(critic["loss_qvalue"]), "loss_value": float(critic["loss_value"]), **self._last_actor, "actor_step": float(actor_step)}
        return TensorDict({k: torch.tensor(values[k]) for k in self.KEYS})

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "actor_steps": self.actor_steps,
            "last_actor": dict(self._last_actor),
            "optimizers": {k: o.state_dict() for k, o in self.update.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps = state_dict["steps"]
        self.actor_steps = state_dict["actor_steps"]
        self._last_actor = dict(state_dict["last_actor"])
        for k, o in self.update.optimizers.items():
            o.load_state_dict(state_dict["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state_dict["schedulers"][k])
