"""BDPO's optimizer steps as three callables, eager, compiled or CUDA-graphed with the same results."""

from __future__ import annotations

import functools
from typing import Mapping

import torch
from tensordict import TensorDict

from torchrl_bdpo.objectives.bdpo import BDPOLoss
from torchrl_bdpo.objectives.denoising import eps_error
from torchrl_bdpo.speed import accelerate
from torchrl_bdpo.speed.behavior import BehaviorProgram

_GROUPS = ("critic", "actor", "behavior")
_PARAMS = {"critic": ("qvalue_network_params", "value_network_params"), "actor": ("actor_network_params",), "behavior": ("behavior_network_params",)}


def _trainable(params) -> list[torch.nn.Parameter]:
    """The parameters a loss holds for one network: none for a parameter-free one (a known reward as
    Q), whose parameters are a plain, empty TensorDict rather than a ``TensorDictParams``."""
    if hasattr(params, "parameters"):
        return list(params.parameters())
    return [p for p in params.values(include_nested=True, leaves_only=True) if isinstance(p, torch.nn.Parameter)]


def make_capturable(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Prepare an optimizer for CUDA-graph capture, in place: ``capturable=True`` and a tensor ``lr``.

    The learning rate becomes a tensor on the parameters' device, so LR schedulers that
    run outside the graph (``scheduler.step()``) still reach the captured update; any
    existing ``step`` state moves to that device too.
    """
    for group in optimizer.param_groups:
        if "capturable" not in group:
            raise ValueError(
                f"{type(optimizer).__name__} has no 'capturable' option: it cannot run inside a CUDA "
                f"graph. Use torch.optim.Adam / AdamW (or another optimizer with capturable=True)."
            )
        device = group["params"][0].device
        group["capturable"] = True
        lr = group["lr"]
        group["lr"] = (lr.detach().clone() if isinstance(lr, torch.Tensor) else torch.tensor(float(lr))).to(device)
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state and isinstance(state["step"], torch.Tensor):
                state["step"] = state["step"].to(device)
    return optimizer


class BDPOUpdate:
    """One BDPO optimizer step per call: :attr:`critic`, :attr:`policy` and :attr:`behavior`.

    - ``critic(batch)``: Q TD + V TD, backward, grad clip, the critic optimizer, the critic
      target EMA (phase B, every step).
    - ``policy(batch)``: the one-step actor loss (and the behavior's denoising loss when
      the loss has ``train_behavior=True``), their optimizers and target EMAs (phase B,
      every k-th step after the warm-up).
    - ``behavior(batch)``: the behavior's denoising step and EMA (phase A).

    Each returns a TensorDict of detached losses and diagnostics (``grad_norm_*`` when
    clipping). LR schedulers stay outside: call ``scheduler.step()`` after a step.

    Args:
        loss (BDPOLoss): the loss.
        optimizers (mapping): ``"critic"``, ``"actor"`` and ``"behavior"`` optimizers over
            the loss's ``qvalue/value``, ``actor`` and ``behavior`` parameters.
        updaters (mapping): ``"critic"``, ``"actor"``, ``"behavior"`` target updaters
            (:meth:`BDPOLoss.make_target_updaters`). An analytic reference
            (:func:`~torchrl_bdpo.diffusion.make_reference`, no parameters) needs neither a
            ``"behavior"`` optimizer nor updater.

    Keyword Args:
        grad_clip (float, optional): max global gradient norm of each network's gradients,
            clipped apart: the Q ensemble, the V ensemble, the actor and the behavior, as the
            authors' code clips its ``q0``, ``vt``, actor and behavior models (one norm over Q
            and V together would let a large Q gradient shrink V's step, and the reverse).
            The steps report each norm before the clip: ``grad_norm_qvalue`` and
            ``grad_norm_value`` (critic step; none for a parameter-free Q), ``grad_norm_actor``,
            ``grad_norm_behavior``. Defaults to ``None`` (no clip).
        compile (bool): ``torch.compile`` each loss method (one graph per loss keeps the
            random draws in eager's order), with static shapes (``dynamic=False``): a batch
            of a new shape compiles anew (torch's recompile limit, 8 per function, applies;
            training batches keep one shape). Defaults to ``False``.
        compile_mode, compile_backend: passed to ``torch.compile``.
        cudagraphs (bool): capture each whole step (losses, backward, clip, optimizer,
            target EMA) in a CUDA graph, one per batch shape. Makes the optimizers
            capturable (:func:`make_capturable`). CUDA only: a ``RuntimeError`` otherwise.
        warmup (int): eager calls before each capture. Defaults to 2.
        overlap_losses (bool): on CUDA, run each step's two independent losses on two CUDA
            streams so that their kernels overlap: the Q TD loss on the current stream and the
            V TD loss on a side stream in :attr:`critic`; the actor loss and the behavior's
            denoising loss (and then their gradient clips, optimizer steps and target EMAs) in
            :attr:`policy`. Their backward passes follow their forwards' streams. Under
            ``cudagraphs`` the captured graph holds the two branches. The same operations are
            issued in the same host order, so the random draws and the results are those of
            the one-stream step. The loss must live on a CUDA device (a ``ValueError``
            otherwise). What it buys, per device: docs/performance.md. Defaults to ``False``.

    Captured steps skip the losses' finiteness checks and always evaluate the Q-target
    paths of terminal next states (their value is masked): shapes must stay static.
    Compiled steps do too, except on a CPU for batches whose next states are all terminal
    (bandits such as the toy 2D tasks), which take a graph without the paths. The CPU speed
    strategies are the loss's :class:`~torchrl_bdpo.speed.SpeedOptions` (``loss.speed``), which the
    update reads and never changes: the Q target on ~``B / N`` rows and the ensemble row chunks
    inside the losses, and here, for compiled (not graphed) CPU :attr:`behavior` steps,
    :class:`~torchrl_bdpo.speed.behavior.BehaviorProgram` (``speed.behavior_program``): the
    denoising loss, its gradients and the clip as one compiled function of the parameters, then
    the optimizer and the EMA on those gradients: the same numbers, less fixed cost per step.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl_bdpo.diffusion import DiffusionActor, EpsilonNetwork, make_qvalue_operator, make_schedule, make_value_operator
        >>> from torchrl_bdpo.objectives import BDPOLoss
        >>> from torchrl_bdpo.training import BDPOUpdate
        >>> def model():
        ...     return DiffusionActor(EpsilonNetwork(2, 3, hidden=16), make_schedule("vp", 5))
        >>> loss = BDPOLoss(model(), model(), make_value_operator(3, 2, hidden=16),
        ...     make_qvalue_operator(3, 2, hidden=16), eta=0.2, num_qvalue_nets=2, num_samples=2)
        >>> optimizers = {g: torch.optim.Adam(p, lr=3e-4) for g, p in BDPOUpdate.param_groups(loss).items()}
        >>> update = BDPOUpdate(loss, optimizers, dict(zip(("critic", "actor", "behavior"),
        ...     loss.make_target_updaters())), grad_clip=1.0)
        >>> done = torch.zeros(8, 1, dtype=torch.bool)
        >>> data = TensorDict({"observation": torch.randn(8, 3), "action": torch.rand(8, 2) * 2 - 1,
        ...     "next": {"observation": torch.randn(8, 3), "reward": torch.randn(8, 1), "done": done, "terminated": done}}, [8])
        >>> sorted(update.critic(data).keys())[:3]
        ['grad_norm_qvalue', 'grad_norm_value', 'kl_per_step']
        >>> "loss_actor" in update.policy(data).keys()
        True
    """

    def __init__(
        self,
        loss,
        optimizers: Mapping[str, torch.optim.Optimizer],
        updaters: Mapping[str, object],
        *,
        grad_clip: float | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        compile_backend: str | None = None,
        cudagraphs: bool = False,
        warmup: int = 2,
        overlap_losses: bool = False,
    ) -> None:
        groups = self.param_groups(loss)
        if not groups["behavior"] and getattr(loss, "train_behavior", False):
            raise ValueError(
                "train_behavior=True, but the behavior (reference) model has no parameters to train (an "
                "analytic reference, make_reference): build the loss with train_behavior=False."
            )
        # an analytic reference (no parameters) needs no behavior optimizer or updater
        needed = [g for g in _GROUPS if g != "behavior" or groups["behavior"]]
        for name, given in (("optimizers", optimizers), ("updaters", updaters)):
            missing = [g for g in needed if g not in given]
            if missing:
                raise KeyError(f"{name} lacks {missing}: expected the keys {needed}.")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip={grad_clip!r}: expected a positive number or None.")
        self.loss = loss
        self.optimizers = dict(optimizers)
        self.updaters = dict(updaters)
        self.grad_clip = grad_clip
        self._side_stream = self._make_side_stream(loss) if overlap_losses else None
        if cudagraphs:
            for opt in self.optimizers.values():
                make_capturable(opt)
        self._params = self.param_groups(loss)
        # each network of a group is clipped apart, as the authors' code clips its q0, vt, actor
        # and behavior models (each has its own clip_by_global_norm + adam): (name, parameters)
        self._clipped = {
            g: [(attr.removesuffix("_network_params"), ps) for attr in attrs if (ps := _trainable(getattr(loss, attr)))] for g, attrs in _PARAMS.items()
        }
        self._compiled, self._cudagraphs = compile, cudagraphs
        self._fns = {
            m: accelerate(getattr(loss, m), compile=compile, mode=compile_mode, backend=compile_backend, dynamic=False, name=m)
            for m in ("qvalue_loss", "value_loss", "actor_loss", "behavior_loss")
        }
        self._behavior_program = None
        if compile and not cudagraphs and self._behavior_program_fits(loss, self._params["behavior"]):
            options = {"mode": compile_mode, "backend": compile_backend}
            self._behavior_program = BehaviorProgram(
                loss, self._params["behavior"], grad_clip, {k: v for k, v in options.items() if v is not None}, error=eps_error
            )
        kw = dict(cudagraphs=cudagraphs, warmup=warmup)
        self.critic = accelerate(self._critic_step, name="critic step", **kw)
        self.policy = accelerate(self._policy_step, name="policy step", **kw)
        self.behavior = accelerate(self._behavior_step, name="behavior step", **kw)

    @staticmethod
    def _behavior_program_fits(loss, params: list) -> bool:
        """Whether :class:`~torchrl_bdpo.speed.behavior.BehaviorProgram` computes ``loss``'s behavior
        step: asked for (``loss.speed.behavior_program``), BDPOLoss's own ``behavior_loss`` with a
        mean or sum reduction, parameters on the CPU."""
        # BDPOLoss's own behavior_loss: a BDPOLoss, so it holds its SpeedOptions
        return (
            getattr(type(loss), "behavior_loss", None) is BDPOLoss.behavior_loss
            and loss.speed.behavior_program
            and loss.reduction in ("mean", "sum")
            and bool(params)
            and all(p.device.type == "cpu" for p in params)
        )

    @staticmethod
    def param_groups(loss) -> dict[str, list[torch.nn.Parameter]]:
        """The trainable parameters of each group: ``{"critic", "actor", "behavior"} -> list``."""
        return {g: [p for attr in attrs for p in _trainable(getattr(loss, attr))] for g, attrs in _PARAMS.items()}

    @staticmethod
    def _make_side_stream(loss):
        """The side CUDA stream of ``overlap_losses``, on the loss's device (a ``ValueError`` off CUDA)."""
        devices = {p.device for p in loss.parameters()}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise ValueError(
                f"overlap_losses=True runs the losses on two CUDA streams, but the loss's parameters "
                f"are on {sorted(str(d) for d in devices)}: move the loss to one CUDA device "
                f"(loss.to('cuda')) before building its optimizers and BDPOUpdate, or leave "
                f"overlap_losses=False."
            )
        return torch.cuda.Stream(next(iter(devices)))

    def _pair(self, first, second):
        """``(first(), second())``: with ``overlap_losses``, ``second`` on the side stream.

        The side stream forks from the current stream before ``first`` is issued and joins it
        after ``second``: all earlier work precedes both branches and all later work follows
        them. That also keeps the caching allocator safe without ``record_stream``: a block
        freed on one stream is reused only by work ordered after the next fork or join.
        """
        side = self._side_stream
        if side is None:
            return first(), second()
        side.wait_stream(torch.cuda.current_stream(side.device))
        a = first()
        with torch.cuda.stream(side):
            b = second()
        self._join_side()
        return a, b

    def _join_side(self) -> None:
        """With ``overlap_losses``: the current stream waits for the side stream's work so far.

        Ends :meth:`_pair`, and follows each backward pass, whose side-stream half ran on the side
        stream: autograd already makes the calling stream wait for it; an explicit join keeps a
        CUDA-graph capture joined whatever autograd does.
        """
        if self._side_stream is not None:
            torch.cuda.current_stream(self._side_stream.device).wait_stream(self._side_stream)

    def _clip(self, name: str, params: list, out: dict) -> None:
        out[f"grad_norm_{name}"] = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)

    def _apply(self, group: str, out: dict, clip: bool = True) -> None:
        """Clip each network of ``group`` apart (Q and V: each on its loss's stream), then the
        group's optimizer step and target EMA."""
        if clip and self.grad_clip:
            parts = [functools.partial(self._clip, name, params, out) for name, params in self._clipped[group]]
            if len(parts) == 2:  # Q and V
                self._pair(*parts)
            else:
                for part in parts:
                    part()
        self.optimizers[group].step()
        self.updaters[group].step()

    def _all_terminal(self, batch) -> bool:
        """Whether a compiled CPU critic step may skip the Q-target paths (every next state terminal).

        Eager steps skip terminal rows by themselves; a compiled graph has static shapes and
        would sample every path, so the batch is looked at here, outside the graph, and the
        graph specialises on the answer (two graphs at most). Not under CUDA graphs, and not
        on a GPU, where the look would cost a host sync per step.
        """
        if not self._compiled or self._cudagraphs or not self.loss.skip_terminal_next:
            return False
        terminated = batch.get(("next", self.loss.tensor_keys.terminated), default=None)
        if terminated is None or terminated.device.type != "cpu":
            return False
        return bool(terminated.all())

    def _critic_step(self, batch):
        self.optimizers["critic"].zero_grad(set_to_none=True)
        # the flag only when set: a loss subclass with its own qvalue_loss(tensordict) still works
        q_kwargs = {"all_terminal": True} if self._all_terminal(batch) else {}
        (q_loss, q_meta), (v_loss, v_meta) = self._pair(lambda: self._fns["qvalue_loss"](batch, **q_kwargs), lambda: self._fns["value_loss"](batch))
        (q_loss + v_loss).backward()
        self._join_side()
        out = {"loss_qvalue": q_loss.detach(), "loss_value": v_loss.detach(), **q_meta, **v_meta}
        self._apply("critic", out)
        return TensorDict(out)

    def _policy_step(self, batch):
        train_behavior = self.loss.train_behavior
        self.optimizers["actor"].zero_grad(set_to_none=True)
        if train_behavior:
            self.optimizers["behavior"].zero_grad(set_to_none=True)
        if not train_behavior:
            a_loss, a_meta = self._fns["actor_loss"](batch)
            a_loss.backward()
            out = {"loss_actor": a_loss.detach(), **a_meta}
            self._apply("actor", out)
            return TensorDict(out)
        (a_loss, a_meta), (b_loss, _) = self._pair(lambda: self._fns["actor_loss"](batch), lambda: self._fns["behavior_loss"](batch))
        out = {"loss_actor": a_loss.detach(), **a_meta, "loss_behavior": b_loss.detach()}
        (a_loss + b_loss).backward()  # disjoint parameters: the same gradients as two backwards
        self._join_side()
        self._pair(lambda: self._apply("actor", out), lambda: self._apply("behavior", out))
        return TensorDict(out)

    def _behavior_step(self, batch):
        if "behavior" not in self.optimizers:
            raise ValueError(
                "behavior step: the behavior (reference) model has no parameters (an analytic reference) and no optimizer; there is nothing to pretrain."
            )
        program = self._behavior_program
        if program is not None and program.accepts(batch):
            out = program.set_grads(batch)
            self._apply("behavior", out, clip=False)  # clipped inside the program
            return TensorDict(out)
        self.optimizers["behavior"].zero_grad(set_to_none=True)
        b_loss, _ = self._fns["behavior_loss"](batch)
        b_loss.backward()
        out = {"loss_behavior": b_loss.detach()}
        self._apply("behavior", out)
        return TensorDict(out)
