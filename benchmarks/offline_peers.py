"""TorchRL's own offline algorithms on our offline buffers: the peers BDPO is measured against.

    python benchmarks/offline_peers.py --dataset generated/hopper/weak-medium-v0 --steps 30000 --eval-every 5000
    python benchmarks/offline_peers.py --dataset /data/my-minari-dataset --algos iql td3bc --seeds 0 1

Each algorithm is built as TorchRL's sota-implementations build it (networks, loss settings,
optimizers, target updates), and trains on the same ``make_offline_buffer`` as BDPO: the same
transitions, the same locomotion reward scale, actions in [-1, 1], batches of 256. They are
evaluated like BDPO (``torchrl_bdpo.envs.evaluate``, the same evaluation seeds, deterministic
actions) every ``--eval-every`` gradient steps:

- ``iql``: ``IQLLoss`` (expectile 0.7, temperature 3, l2), TanhNormal actor, Q, V, 2 x 256 MLPs;
- ``cql``: ``CQLLoss`` (Lagrangian, threshold 5, 10 random actions, l2), behavior cloning of the
  actor for the first 4% of the steps (TorchRL's 40k of 1M);
- ``td3bc``: ``TD3BCLoss`` (alpha 2.5, policy noise 0.2 clipped at 0.5, actor every 2nd step,
  target EMA 0.005 with the actor, Adam eps 1e-4);
- ``bc``: a deterministic tanh MLP regressed on the data's actions (mean squared error).

Out: ``peers.json`` (every evaluation of every run, the dataset's own mean return, wall time),
torchrl CSV logs per run under ``logs/`` and ``peers.png`` (return against steps).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tensordict.nn import NormalParamExtractor, TensorDictModule, TensorDictSequential
from torch import nn
from tqdm import tqdm

from torchrl_bdpo.data import episode_returns, make_offline_buffer
from torchrl_bdpo.envs import eval_env_id, eval_seed, evaluate, make_eval_env
from torchrl_bdpo.provenance import run_record

ALGOS = ("iql", "cql", "td3bc", "bc")


def _action_spec(action_dim: int):
    from torchrl.data import Bounded

    return Bounded(low=-1.0, high=1.0, shape=(action_dim,))


def _mlp(in_dim: int, out_dim: int, hidden: int):
    from torchrl.modules import MLP

    return MLP(in_features=in_dim, out_features=out_dim, num_cells=[hidden, hidden], activation_class=nn.ReLU)


def _tanh_normal_actor(obs_dim: int, action_dim: int, hidden: int):
    """TorchRL's IQL / CQL actor: TanhNormal with a biased-softplus scale bounded below by 0.1."""
    from torchrl.envs.utils import ExplorationType
    from torchrl.modules import ProbabilisticActor, TanhNormal

    spec = _action_spec(action_dim)
    net = nn.Sequential(_mlp(obs_dim, 2 * action_dim, hidden), NormalParamExtractor(scale_mapping="biased_softplus_1.0", scale_lb=0.1))
    return ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        spec=spec,
        distribution_class=TanhNormal,
        distribution_kwargs={"low": spec.space.low, "high": spec.space.high, "tanh_loc": False},
        default_interaction_type=ExplorationType.RANDOM,
    )


def _tanh_actor(obs_dim: int, action_dim: int, hidden: int):
    """TorchRL's TD3+BC actor: an MLP through ``TanhModule`` onto the action box."""
    from torchrl.modules import TanhModule

    return TensorDictSequential(
        TensorDictModule(_mlp(obs_dim, action_dim, hidden), in_keys=["observation"], out_keys=["param"]),
        TanhModule(in_keys=["param"], out_keys=["action"], spec=_action_spec(action_dim)),
    )


def _qvalue(obs_dim: int, action_dim: int, hidden: int):
    from torchrl.modules import ValueOperator

    return ValueOperator(_mlp(obs_dim + action_dim, 1, hidden), in_keys=["observation", "action"])


def _params(tdparams) -> list:
    return list(tdparams.flatten_keys().values())


class Peer:
    """One algorithm: ``update(batch)`` does one gradient step and returns its scalars; ``policy``
    acts (deterministically under ``ExplorationType.DETERMINISTIC``)."""

    policy: nn.Module
    optims: list
    updater = None

    def update(self, batch, step: int) -> dict:
        raise NotImplementedError

    def _step(self, total) -> None:
        """One backward of ``total`` through every optimizer of the peer, then its target update."""
        for o in self.optims:
            o.zero_grad(set_to_none=True)
        total.backward()
        for o in self.optims:
            o.step()
        if self.updater is not None:
            self.updater.step()


class IQL(Peer):
    def __init__(self, obs_dim, action_dim, hidden=256, lr=3e-4, gamma=0.99, tau=0.005):
        from torchrl.modules import ValueOperator
        from torchrl.objectives import IQLLoss, SoftUpdate

        self.policy = _tanh_normal_actor(obs_dim, action_dim, hidden)
        value = ValueOperator(_mlp(obs_dim, 1, hidden), in_keys=["observation"])
        self.loss = IQLLoss(self.policy, _qvalue(obs_dim, action_dim, hidden), value_network=value, loss_function="l2", temperature=3.0, expectile=0.7)
        self.loss.make_value_estimator(gamma=gamma)
        self.updater = SoftUpdate(self.loss, tau=tau)
        self.optims = [
            torch.optim.Adam(_params(p), lr=lr) for p in (self.loss.actor_network_params, self.loss.qvalue_network_params, self.loss.value_network_params)
        ]

    def update(self, batch, step):
        out = self.loss(batch)
        self._step(out["loss_actor"] + out["loss_qvalue"] + out["loss_value"])
        return {k: out[k].item() for k in ("loss_actor", "loss_qvalue", "loss_value")}


class CQL(Peer):
    def __init__(self, obs_dim, action_dim, hidden=256, lr=3e-4, gamma=0.99, tau=0.005, bc_steps=0):
        from torchrl.objectives import CQLLoss, SoftUpdate

        self.policy = _tanh_normal_actor(obs_dim, action_dim, hidden)
        self.loss = CQLLoss(
            self.policy,
            _qvalue(obs_dim, action_dim, hidden),
            loss_function="l2",
            temperature=1.0,
            min_q_weight=1.0,
            max_q_backup=False,
            deterministic_backup=False,
            num_random=10,
            with_lagrange=True,
            lagrange_thresh=5.0,
        )
        self.loss.make_value_estimator(gamma=gamma)
        self.updater = SoftUpdate(self.loss, tau=tau)
        self.bc_steps = bc_steps
        self.optims = [
            torch.optim.Adam(_params(self.loss.actor_network_params), lr=lr),
            torch.optim.Adam(_params(self.loss.qvalue_network_params), lr=lr),
            torch.optim.Adam([self.loss.log_alpha], lr=lr),
            torch.optim.Adam([self.loss.log_alpha_prime], lr=lr),
        ]

    def update(self, batch, step):
        out = self.loss(batch)
        actor = out["loss_actor"] if step >= self.bc_steps else out["loss_actor_bc"]
        self._step(actor + out["loss_qvalue"] + out["loss_cql"] + out["loss_alpha"] + out["loss_alpha_prime"])
        return {"loss_actor": actor.item(), "loss_qvalue": out["loss_qvalue"].item(), "loss_cql": out["loss_cql"].item()}


class TD3BC(Peer):
    def __init__(self, obs_dim, action_dim, hidden=256, lr=3e-4, gamma=0.99, tau=0.005, actor_every=2):
        from torchrl.objectives import SoftUpdate, TD3BCLoss

        self.policy = _tanh_actor(obs_dim, action_dim, hidden)
        self.loss = TD3BCLoss(
            actor_network=self.policy,
            qvalue_network=_qvalue(obs_dim, action_dim, hidden),
            num_qvalue_nets=2,
            loss_function="l2",
            delay_actor=True,
            delay_qvalue=True,
            action_spec=_action_spec(action_dim),
            policy_noise=0.2,
            noise_clip=0.5,
            alpha=2.5,
        )
        self.loss.make_value_estimator(gamma=gamma)
        self.updater = SoftUpdate(self.loss, tau=tau)
        self.actor_every = actor_every
        self.actor_optim = torch.optim.Adam(_params(self.loss.actor_network_params), lr=lr, eps=1e-4)
        self.critic_optim = torch.optim.Adam(_params(self.loss.qvalue_network_params), lr=lr, eps=1e-4)

    def update(self, batch, step):
        q_loss, _ = self.loss.qvalue_loss(batch)
        self.critic_optim.zero_grad(set_to_none=True)
        q_loss.backward()
        self.critic_optim.step()
        row = {"loss_qvalue": q_loss.item()}
        if step % self.actor_every == 0:
            actor_loss, _ = self.loss.actor_loss(batch)
            self.actor_optim.zero_grad(set_to_none=True)
            actor_loss.backward()
            self.actor_optim.step()
            self.updater.step()
            row["loss_actor"] = actor_loss.item()
        return row


class BC(Peer):
    def __init__(self, obs_dim, action_dim, hidden=256, lr=3e-4):
        self.policy = _tanh_actor(obs_dim, action_dim, hidden)
        self.optims = [torch.optim.Adam(self.policy.parameters(), lr=lr)]

    def update(self, batch, step):
        pred = self.policy(batch.select("observation").clone())["action"]
        loss = (pred - batch["action"]).pow(2).sum(-1).mean()
        self._step(loss)
        return {"loss_bc": loss.item()}


def make_peer(name: str, obs_dim: int, action_dim: int, steps: int, hidden: int = 256) -> Peer:
    if name == "iql":
        return IQL(obs_dim, action_dim, hidden)
    if name == "cql":
        return CQL(obs_dim, action_dim, hidden, bc_steps=round(0.04 * steps))
    if name == "td3bc":
        return TD3BC(obs_dim, action_dim, hidden)
    if name == "bc":
        return BC(obs_dim, action_dim, hidden)
    raise ValueError(f"algorithm {name!r}: expected one of {', '.join(ALGOS)}.")


def plot(result: dict, out: Path) -> Path:
    from torchrl_bdpo.plotting import curve, finish, subplots

    fig, (ax,) = subplots()
    for algo, runs in result["runs"].items():
        steps = [e["step"] for e in next(iter(runs.values()))["evals"]]
        means = [[e["mean"] for e in run["evals"]] for run in runs.values()]
        curve(ax, steps, means, f"{algo} ({len(runs)} seed{'s' * (len(runs) > 1)})")
    if result["dataset"]["mean_return"] is not None:
        ax.axhline(result["dataset"]["mean_return"], color="k", ls="--", lw=1, label="dataset mean return")
    ylabel = f"return ({result['settings']['episodes']} episodes)"
    return finish(fig, [(ax, "gradient steps", ylabel)], out / "peers.png", title=result["dataset"]["name"], legend_size=8)


def run(args) -> dict:
    from torchrl.envs.utils import ExplorationType
    from torchrl.record.loggers import get_logger

    for a in args.algos:
        if a not in ALGOS:
            raise ValueError(f"--algos {a}: expected some of {', '.join(ALGOS)}.")
    if args.steps < 1 or args.eval_every < 1 or args.episodes < 1:
        raise ValueError(f"--steps {args.steps}, --eval-every {args.eval_every}, --episodes {args.episodes}: each must be >= 1.")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buffer = make_offline_buffer(args.dataset, batch_size=args.batch_size, download=False)
    info = buffer.dataset_info
    data = buffer.storage[: len(buffer)]
    dataset_returns = (episode_returns(data) / info.reward_scale).numpy() if info.reward_scale else None
    env = make_eval_env(eval_env_id(info, args.eval_env), 1, 0, torch.device("cpu"), info.action_scaling())
    eval_steps = sorted({*range(args.eval_every, args.steps + 1, args.eval_every), args.steps})
    dataset = {**info.as_dict(), "mean_return": float(dataset_returns.mean()) if dataset_returns is not None else None}
    result = run_record(args, leave_out=("out_dir",), dataset=dataset, runs={})
    path = out / "peers.json"
    for algo in args.algos:
        for seed in args.seeds:
            torch.manual_seed(seed)
            np.random.seed(seed)
            peer = make_peer(algo, info.observation_dim, info.action_dim, args.steps, args.hidden)
            logger = get_logger("csv", logger_name=str(out / "logs"), experiment_name=f"{algo}_seed{seed}")
            evals, t0 = [], time.perf_counter()
            for step in tqdm(range(1, args.steps + 1), desc=f"{algo} seed {seed}", disable=not args.progress):
                row = peer.update(buffer.sample(), step)
                if not all(np.isfinite(v) for v in row.values()):
                    raise FloatingPointError(f"{algo} seed {seed}: a non-finite loss at step {step}: {row}")
                if step % args.log_interval == 0:
                    for k, v in row.items():
                        logger.log_scalar(k, v, step=step)
                if step in eval_steps:
                    # BDPO's evaluation start states
                    returns = evaluate(env, peer.policy, args.episodes, args.max_steps, ExplorationType.DETERMINISTIC, seed=eval_seed(seed))
                    e = {"step": step, "mean": float(returns.mean()), "std": float(returns.std()), "returns": returns.tolist()}
                    if info.ref_min_score is not None and info.ref_max_score is not None:
                        e["normalized"] = float(info.normalized_score(returns.mean()))
                    evals.append(e)
                    logger.log_scalar("eval/return", e["mean"], step=step)
            result["runs"].setdefault(algo, {})[str(seed)] = {"evals": evals, "wall_s": time.perf_counter() - t0}
            path.write_text(json.dumps(result, indent=1))  # kept after every run
    env.close()
    result["plot"] = str(plot(result, out))
    path.write_text(json.dumps(result, indent=1))
    return result


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="a Minari id stored locally, a D4RL id, or a local Minari dataset's path")
    p.add_argument("--algos", nargs="+", default=list(ALGOS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=30000, help="gradient steps (BDPO's cpu budget: 30k phase-B steps)")
    p.add_argument("--eval-every", type=int, default=5000)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--log-interval", type=int, default=1000)
    p.add_argument("--eval-env", default=None, help="Gymnasium id; default: the dataset's own env")
    p.add_argument("--out-dir", default="outputs/peers")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    result = run(args)
    for algo, runs in result["runs"].items():
        finals = [run_["evals"][-1]["mean"] for run_ in runs.values()]
        print(f"{algo}: final return {np.mean(finals):.1f} +- {np.std(finals):.1f} over {len(finals)} seed(s)")
    return result


if __name__ == "__main__":
    main()
