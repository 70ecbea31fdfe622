"""Best-of-K acting: draw candidates from a diffusion actor, keep the one the Q ensemble likes best."""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictModuleBase
from tensordict.utils import NestedKey
from torchrl.envs.utils import ExplorationType, exploration_type

from torchrl_bdpo._validation import check_finite
from torchrl_bdpo.speed.compile import accelerate
from torchrl_bdpo.diffusion.actor import DiffusionActor
from torchrl_bdpo.ensemble import aggregate_ensemble, check_aggregation, ensemble_apply

SELECTIONS = ("q", "average", "elite")


def check_selection(
    selection: str, prefix: str = "", aggregation: str = "mean", rho: float = 0.0, num_elite: int | None = None, num_candidates: int | None = None
) -> None:
    """Raise a ``ValueError`` that names the value for an unknown ``selection``; for
    ``selection="average"`` with a Q rule other than the default (``aggregation`` not ``"mean"``
    or ``rho`` not 0: the mean of the candidates does not read Q, so the rule would be silently
    unused); for a ``num_elite`` that is not an integer in ``[1, num_candidates]`` with
    ``selection="elite"``, or one set with another selection. ``prefix``: ``"eval."`` in the scripts.
    """
    if selection not in SELECTIONS:
        raise ValueError(
            f"{prefix}selection={selection!r}: expected one of {SELECTIONS} ('q': the candidate with the best Q, the paper's; "
            "'average': the mean of the candidates; 'elite': the mean of the num_elite candidates with the best Q)."
        )
    if selection == "average" and (aggregation != "mean" or rho != 0):
        raise ValueError(
            f"{prefix}selection='average' with {prefix}aggregation={aggregation!r}, {prefix}rho={rho!r}: the mean of the "
            f"candidates does not use Q, so the Q rule would be ignored; set {prefix}aggregation=mean and {prefix}rho=0, "
            f"or {prefix}selection=q to rank by it."
        )
    if selection == "elite":
        top = num_candidates if num_candidates is not None else "num_candidates"
        if isinstance(num_elite, bool) or not isinstance(num_elite, int) or num_elite < 1 or (num_candidates is not None and num_elite > num_candidates):
            raise ValueError(
                f"{prefix}num_elite={num_elite!r} with {prefix}selection='elite': expected an integer in [1, {top}] "
                "(how many of the best candidates by Q are averaged)."
            )
    elif num_elite is not None:
        raise ValueError(
            f"{prefix}num_elite={num_elite!r} with {prefix}selection={selection!r}: only selection='elite' averages the "
            f"best candidates; set {prefix}selection=elite or {prefix}num_elite=null."
        )


def select_by_q(candidates: torch.Tensor, q_values: torch.Tensor) -> torch.Tensor:
    """Pick ``candidates[..., argmax_k q_values[..., k], :]``: ``[*B, K, A], [*B, K] -> [*B, A]``."""
    idx = q_values.argmax(-1, keepdim=True).unsqueeze(-1).expand(*candidates.shape[:-2], 1, candidates.shape[-1])
    return candidates.gather(-2, idx).squeeze(-2)


def mean_of_best(candidates: torch.Tensor, q_values: torch.Tensor, num_elite: int) -> torch.Tensor:
    """The mean of the ``num_elite`` candidates with the largest ``q_values``: ``[*B, K, A], [*B, K] -> [*B, A]``."""
    idx = q_values.topk(num_elite, dim=-1).indices.unsqueeze(-1).expand(*candidates.shape[:-2], num_elite, candidates.shape[-1])
    return candidates.gather(-2, idx).mean(-2)


class QSelectActor(TensorDictModuleBase):
    """Acting module of BDPO: ``num_candidates`` actions from the (target) actor, argmax of the ensemble's Q.

    Exploration types: ``RANDOM`` returns one sample of the actor (no selection); any
    other type, or none set, returns the best of ``num_candidates`` (or, with
    ``selection="average"``, their mean; with ``"elite"``, the mean of the best few).

    Args:
        actor (DiffusionActor): the diffusion policy.
        qvalue_network (TensorDictModule): ``Q(s, a)`` with in_keys (observation, action).

    Keyword Args:
        actor_params (TensorDictBase, optional): parameters to run the actor with (e.g. a
            loss's ``target_actor_network_params``); defaults to the actor's own.
        qvalue_params (TensorDictBase, optional): ensemble parameters ``[K, ...]``; defaults
            to the Q network's own (``K = 1``).
        num_qvalue_nets (int): ``K``. Defaults to 1.
        num_candidates (int): candidates per state. Defaults to 10.
        aggregation (str): how the ensemble's ``Q`` of a candidate is reduced before the argmax:
            ``"mean"`` (the paper's), ``"lcb"`` (mean - ``rho`` x std) or ``"min"``. The lower
            bounds aim at the winner's curse of an argmax over a Q that overrates some of the
            actor's actions; with 4 critics on Hopper fewer candidates did more
            (docs/results/locomotion.md, "What each change did"). Defaults to ``"mean"``.
        rho (float): the LCB's weight (``aggregation="lcb"`` only). Defaults to 0.
        selection (str): ``"q"``, the candidate with the best aggregated Q (the paper's), or
            ``"average"``, the mean of the ``num_candidates`` candidates (a Monte Carlo estimate of
            the policy's mean action; Q is not used). The mean of a multimodal policy can fall
            between its modes: it suits policies that are close to unimodal, such as a behavior
            cloned from a stochastic Gaussian policy. With it, ``aggregation`` must stay ``"mean"``
            and ``rho`` 0 (a clear error otherwise). ``"elite"``: the mean of the ``num_elite``
            candidates with the best aggregated Q, between the two (``num_elite=1`` is ``"q"``,
            ``num_elite=num_candidates`` is ``"average"``). Defaults to ``"q"``.
        num_elite (int, optional): how many of the best candidates ``selection="elite"`` averages
            (required with it, refused without it).
        observation_key, action_key (NestedKey): default ``"observation"``, ``"action"``.
        compile (bool): ``torch.compile`` the sampling and selection (first call eager), one
            graph per batch shape (``dynamic=False``: torch 2.11's dynamo fails on the
            ensemble's ``vmap`` over a symbolic batch size, a ``TorchRuntimeError`` at the
            second batch size, seen on an H200). Defaults to ``False``.
        cudagraphs (bool): capture them in a CUDA graph per batch shape
            (:func:`torchrl_bdpo.speed.accelerate`); CUDA only. Defaults to ``False``.
        compile_mode, compile_backend: passed to ``torch.compile``.
        warmup (int): eager calls before a capture. Defaults to 2.
        validate (bool): check that observations are finite (one host sync per call).
            Defaults to ``True``.
    """

    def __init__(
        self,
        actor: DiffusionActor,
        qvalue_network: TensorDictModule,
        *,
        actor_params: TensorDictBase | None = None,
        qvalue_params: TensorDictBase | None = None,
        num_qvalue_nets: int = 1,
        num_candidates: int = 10,
        aggregation: str = "mean",
        rho: float = 0.0,
        selection: str = "q",
        num_elite: int | None = None,
        observation_key: NestedKey = "observation",
        action_key: NestedKey = "action",
        compile: bool = False,
        cudagraphs: bool = False,
        compile_mode: str | None = None,
        compile_backend: str | None = None,
        warmup: int = 2,
        validate: bool = True,
    ) -> None:
        super().__init__()
        from tensordict import TensorDict

        if not isinstance(num_candidates, int) or num_candidates < 1:
            raise ValueError(f"num_candidates={num_candidates!r}: expected an integer >= 1.")
        check_aggregation(aggregation, rho)
        check_selection(selection, aggregation=aggregation, rho=rho, num_elite=num_elite, num_candidates=num_candidates)
        self.actor = actor
        self.qvalue_network = qvalue_network
        self.actor_params = actor_params if actor_params is not None else TensorDict.from_module(actor, as_module=True)
        if qvalue_params is None:
            qvalue_params = TensorDict.from_module(qvalue_network, as_module=True).unsqueeze(0)
            num_qvalue_nets = 1
        self.qvalue_params = qvalue_params
        self.num_qvalue_nets = num_qvalue_nets
        self.num_candidates = num_candidates
        self.aggregation = aggregation
        self.rho = float(rho)
        self.selection = selection
        self.num_elite = num_elite
        self.observation_key = observation_key
        self.action_key = action_key
        self.in_keys = [observation_key]
        self.out_keys = [action_key]
        self.validate = validate
        kw = dict(compile=compile, cudagraphs=cudagraphs, mode=compile_mode, backend=compile_backend, dynamic=False, warmup=warmup)
        # wrapped only when accelerated: a plain module holds no bound method of itself
        self._select = self._sample = None
        if compile or cudagraphs:
            self._select = accelerate(self.select, name="QSelectActor.select", **kw)
            self._sample = accelerate(self.sample, name="QSelectActor.sample", **kw)

    def sample(self, observation: torch.Tensor) -> torch.Tensor:
        """One action of the actor for ``observation`` ``[*B, S]`` (no selection)."""
        with self.actor_params.to_module(self.actor, preserve_module_state=False):
            return self.actor.sample_path(observation).action

    def candidates(self, observation: torch.Tensor) -> torch.Tensor:
        """``num_candidates`` actions of the actor for ``observation`` ``[*B, S]``: ``[*B, K, A]``."""
        with self.actor_params.to_module(self.actor, preserve_module_state=False):
            return self.actor.sample_path(observation, num_samples=self.num_candidates).action

    def rank(self, observation: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """The ensemble's aggregated Q of each candidate: ``[*B, S], [*B, K, A] -> [*B, K]``."""
        obs = observation.unsqueeze(-2).expand(*observation.shape[:-1], candidates.shape[-2], observation.shape[-1])
        values = {self.observation_key: obs, self.action_key: candidates}
        inputs = [values[k] for k in self.qvalue_network.in_keys]
        q = ensemble_apply(self.qvalue_network, self.qvalue_params, inputs, self.num_qvalue_nets)
        return aggregate_ensemble(q.squeeze(-1), self.aggregation, self.rho)

    def select(self, observation: torch.Tensor) -> torch.Tensor:
        """The best-of-K action for ``observation`` ``[*B, S]`` (``selection="average"``: the candidates' mean;
        ``"elite"``: the mean of the ``num_elite`` best by Q)."""
        candidates = self.candidates(observation)
        if self.selection == "average":
            return candidates.mean(-2)
        q = self.rank(observation, candidates)
        if self.selection == "elite":
            return mean_of_best(candidates, q, self.num_elite)
        return select_by_q(candidates, q)

    @torch.no_grad()
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        observation = tensordict.get(self.observation_key)
        if self.validate:
            check_finite(f"tensordict[{self.observation_key!r}]", observation)
        if exploration_type() == ExplorationType.RANDOM:
            action = (self._sample or self.sample)(observation)
        else:
            action = (self._select or self.select)(observation)
        tensordict.set(self.action_key, action)
        return tensordict
