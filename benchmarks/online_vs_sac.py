"""Online BDPO (uniform reference) against TorchRL's SAC: the same env, frames and updates per frame.

    python benchmarks/online_vs_sac.py --env Pendulum-v1 --frames 20000 --seeds 0 1
    python benchmarks/online_vs_sac.py --env Hopper-v5 --frames 50000 --bdpo auto_eta.enabled=true
    python benchmarks/online_vs_sac.py --seeds 1 --threads 1 --out-dir outputs/online_vs_sac/seed1  # two side by side
    python benchmarks/online_vs_sac.py --algos sac --seeds 0 --out-dir outputs/online_vs_sac/sac0      # one algorithm
    python benchmarks/online_vs_sac.py --merge outputs/online_vs_sac/seed0 outputs/online_vs_sac/seed1 --out-dir outputs/online_vs_sac/all

BDPO runs through ``sota-implementations/bdpo/bdpo_online.py`` (its config plus ``--bdpo``
overrides). SAC is TorchRL's ``SACLoss`` with its sota script's settings (2 x 256 ReLU MLPs,
TanhNormal actor, clipped double Q, automatic temperature, lr 3e-4, target EMA 0.005, batch
256) on the same frames, ``frames_per_batch``, ``init_random_frames`` and updates per frame.
Both are evaluated at the same frames by ``torchrl_bdpo.envs.evaluate`` from the same start
states (SAC deterministic; BDPO best-of-K and one sample). At each evaluation both also log their
target Q's mean on the actions their evaluated policy took against the Monte Carlo return that
followed (``q_policy``, ``mc_return_policy``, over the steps whose return a time limit did not
cut), and the soft return their soft Q estimates (``mc_soft_return_policy``: the rewards less
gamma times the next state's penalty, SAC's ``alpha * log pi``, BDPO's ``eta * path KL``), so
that overestimation on each one's own actions compares. Out: ``online_vs_sac.json`` (every
evaluation, env frames/s, seconds in collection / updates / evaluations and torch threads of
each run) and ``online_vs_sac.png``. ``--merge`` joins the JSONs of runs made apart (other
seeds, one algorithm each) into one JSON and figure; their settings must agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from torchrl_bdpo.envs import eval_seed, evaluate, make_env
from torchrl_bdpo.provenance import run_record

SCRIPT_DIR = Path(__file__).resolve().parents[1] / "sota-implementations" / "bdpo"


PROBE_KEYS = tuple(
    f"{k}{suffix}"
    for suffix in ("", "_one_sample")  # BDPO's best-of-K and one-sample evaluations
    for k in ("q_policy", "mc_return_policy", "mc_soft_return_policy", "policy_probe_states", "path_kl_mean", "path_kl_p90")
)


def run_bdpo(args, seed: int, out: Path) -> dict:
    from hydra import compose, initialize_config_dir

    sys.path.insert(0, str(SCRIPT_DIR))
    import bdpo_online

    overrides = [
        f"env.name={args.env}",
        f"seed={seed}",
        f"collector.total_frames={args.frames}",
        f"collector.frames_per_batch={args.frames_per_batch}",
        f"collector.init_random_frames={args.init_random_frames}",
        f"optim.utd_ratio={args.utd_ratio}",
        f"eval.interval={args.eval_every}",
        f"eval.episodes={args.episodes}",
        f"checkpoint.interval={args.eval_every}",
        f"logger.log_interval={args.frames_per_batch}",
        f"output_dir={out}",
        *args.bdpo,
    ]
    with initialize_config_dir(config_dir=str(SCRIPT_DIR / "config"), version_base="1.3"):
        cfg = compose("online", overrides=overrides)
    summary = bdpo_online.train(cfg)
    return {
        "evals": [
            {
                "frames": r["frames"],
                "mean": r["return_mean"],
                "std": r["return_std"],
                "one_sample_mean": r["return_one_sample_mean"],
                "eta": r["eta"],
                # Q on the best-of-K policy's actions against their MC return, the path KL per state
                **{k: r[k] for k in PROBE_KEYS if k in r},
            }
            for r in summary["evaluations"]
        ],
        "train_returns": [list(x) for x in summary["train_episode_returns"]],
        "wall_s": summary["wall_time_s"],
        "frames_per_s": summary["frames"] / summary["wall_time_s"],
        "time_s": summary["time_s"],
        "threads": torch.get_num_threads(),
        "overrides": overrides,
    }


SAC_GAMMA = 0.99


def sac_target_q(loss):
    """``q(observation, action)``: the mean of a TorchRL ``SACLoss``'s target Q ensemble, the Q
    its TD targets read (a functional call: the loss's modules and parameters are left as they are)."""
    from tensordict import TensorDict

    net, params = loss.qvalue_network, loss.target_qvalue_network_params

    def q(observation, action):
        td = TensorDict({"observation": observation, "action": action}, [observation.shape[0]])
        values = [torch.func.functional_call(net, dict(params[i].flatten_keys(".").items()), (td.clone(),)) for i in range(params.shape[0])]
        return torch.stack([v.get("state_action_value") for v in values]).mean(0)

    return q


def sac_next_penalty(loss):
    """``next_observation -> alpha * log pi(a'|s')``, ``a'`` one draw of SAC's actor: what a
    TorchRL ``SACLoss`` (v2) target subtracts (over ``gamma``) at the next state, with the loss's
    current temperature. Draws from torch's generator (the harness forks it)."""
    from tensordict import TensorDict
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    log_alpha, bounds = loss.log_alpha.detach(), (loss.min_log_alpha, loss.max_log_alpha)
    alpha = float((log_alpha.clamp(*bounds) if any(b is not None for b in bounds) else log_alpha).exp())  # as SACLoss._alpha

    def penalty(observation):
        td = TensorDict({"observation": observation}, [observation.shape[0]])
        with set_exploration_type(ExplorationType.RANDOM), loss.actor_network_params.to_module(loss.actor_network):
            dist = loss.actor_network.get_dist(td)
            action = dist.rsample()
            return alpha * dist.log_prob(action)

    return penalty


def episode_ends(batch, frames: int, running: float) -> tuple[list[tuple[int, float]], float]:
    """The training episodes that end in a collector batch of one env, in time order:
    ``([(frames, return), ...], running)``, with ``running`` the unfinished episode's reward so
    far (carry it into the next batch). ``frames`` is the frame count after the batch, as
    ``bdpo_online``'s ``train_episode_returns`` records it. Reads the batch only: no draws."""
    rewards = batch.get(("next", "reward")).reshape(-1).tolist()
    dones = batch.get(("next", "done")).reshape(-1).tolist()
    ends = []
    for r, d in zip(rewards, dones):
        running += r
        if d:
            ends.append((frames, running))
            running = 0.0
    return ends, running


def run_sac(args, seed: int) -> dict:
    """TorchRL's SAC (sota settings) on the same frames and updates per frame."""
    from torchrl.collectors import Collector
    from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
    from torchrl.envs.utils import ExplorationType
    from torchrl.objectives import SoftUpdate

    from torchrl_bdpo.data.generate import make_sac

    torch.manual_seed(seed)
    np.random.seed(seed)
    env, eval_env = make_env(args.env, seed), make_env(args.env, eval_seed(seed))
    actor, loss = make_sac(env, 256, SAC_GAMMA)
    sys.path.insert(0, str(SCRIPT_DIR))
    from utils import q_policy_probe

    updater = SoftUpdate(loss, tau=0.005)
    optims = [
        torch.optim.Adam(loss.actor_network_params.parameters(), lr=3e-4),
        torch.optim.Adam(loss.qvalue_network_params.parameters(), lr=3e-4),
        torch.optim.Adam([loss.log_alpha], lr=3e-4),
    ]
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(args.frames), batch_size=256)
    collector = Collector(
        env,
        actor,
        frames_per_batch=args.frames_per_batch,
        total_frames=args.frames,
        init_random_frames=args.init_random_frames,
        auto_register_policy_transforms=False,  # SAC's actor is not recurrent
    )
    frames, evals, t0, out = 0, [], time.perf_counter(), None
    train_returns, running = [], 0.0
    seconds = {"collect": 0.0, "update": 0.0, "eval": 0.0}  # as bdpo_online's summary splits them
    t_mark = time.perf_counter()
    for batch in tqdm(collector, total=args.frames // args.frames_per_batch, desc=f"SAC {args.env} seed {seed}"):
        seconds["collect"] += time.perf_counter() - t_mark
        rb.extend(batch.reshape(-1))
        frames += batch.numel()
        ends, running = episode_ends(batch, frames, running)
        train_returns += ends
        if frames >= args.init_random_frames:
            t_update = time.perf_counter()
            for _ in range(max(1, round(args.utd_ratio * batch.numel()))):
                out = loss(rb.sample())
                total = out["loss_actor"] + out["loss_qvalue"] + out["loss_alpha"]
                for o in optims:
                    o.zero_grad(set_to_none=True)
                total.backward()
                for o in optims:
                    o.step()
                updater.step()
            collector.update_policy_weights_()
            seconds["update"] += time.perf_counter() - t_update
        if frames % args.eval_every == 0:
            t_eval = time.perf_counter()
            returns, episodes = evaluate(eval_env, actor, args.episodes, 1000, ExplorationType.DETERMINISTIC, keep_episodes=True, seed=eval_seed(seed))
            row = {"frames": frames, "mean": float(returns.mean()), "std": float(returns.std())}
            with torch.random.fork_rng():  # the soft return's draws leave SAC's stream as it was
                row.update(q_policy_probe(sac_target_q(loss), episodes, 1.0, SAC_GAMMA, torch.device("cpu"), next_penalty=sac_next_penalty(loss)))
            if out is not None:  # the last update's temperature and entropy estimate (-log pi of its actions, nats)
                row.update(alpha=float(out["alpha"]), entropy=float(out["entropy"]))
            evals.append(row)
            seconds["eval"] += time.perf_counter() - t_eval
        t_mark = time.perf_counter()
    collector.shutdown()
    wall = time.perf_counter() - t0
    return {
        "evals": evals,
        "train_returns": train_returns,
        "wall_s": wall,
        "frames_per_s": frames / wall,
        "time_s": seconds,
        "threads": torch.get_num_threads(),
    }


def plot(result: dict, out: Path) -> Path:
    from torchrl_bdpo.plotting import curve, finish, subplots

    fig, (ax,) = subplots()
    for name, key, field, style in (
        ("BDPO, best of K", "bdpo", "mean", "-"),
        ("BDPO, one sample", "bdpo", "one_sample_mean", ":"),
        ("SAC", "sac", "mean", "-"),
    ):
        runs = list(result["runs"][key].values())
        if not runs:
            continue
        x = [e["frames"] for e in runs[0]["evals"]]
        seeds = f" ({len(runs)} seed{'s' * (len(runs) > 1)})"
        curve(ax, x, [[e[field] for e in r["evals"]] for r in runs], name + seeds, "C0" if key == "sac" else "C1", ls=style)
    ylabel = f"return ({result['settings']['episodes']} episodes)"
    return finish(fig, [(ax, "environment frames", ylabel)], out / "online_vs_sac.png", title=result["settings"]["env"], legend_size=8)


# settings that two runs must share to be compared or merged
SHARED = ("env", "frames", "frames_per_batch", "init_random_frames", "utd_ratio", "eval_every", "episodes")


def merge(dirs: list[str]) -> dict:
    """One result from the ``online_vs_sac.json`` of several runs (other seeds or one algorithm each)."""
    merged = None
    for d in dirs:
        path = Path(d) / "online_vs_sac.json"
        if not path.exists():
            raise FileNotFoundError(f"--merge {d}: no online_vs_sac.json there; expected the --out-dir of a finished run")
        part = json.loads(path.read_text())
        if merged is None:
            merged = {"settings": {k: part["settings"][k] for k in SHARED}, "machine": part["machine"], "runs": {"bdpo": {}, "sac": {}}, "merged_from": []}
        for k in SHARED:
            if part["settings"][k] != merged["settings"][k]:
                have, want = part["settings"][k], merged["settings"][k]
                raise ValueError(f"--merge {d}: {k}={have!r} there but {want!r} in {dirs[0]}; runs merge only with the same {', '.join(SHARED)}")
        for key in ("bdpo", "sac"):
            for seed, run in part["runs"][key].items():
                if seed in merged["runs"][key]:
                    raise ValueError(f"--merge {d}: {key} seed {seed} is in two of the folders; pass each run once")
                merged["runs"][key][seed] = {**run, "from": str(path)}
        merged["merged_from"].append(str(path))
    return merged


def report(result: dict, out: Path) -> dict:
    path = out / "online_vs_sac.json"
    result["plot"] = str(plot(result, out))
    path.write_text(json.dumps(result, indent=1))
    for key in ("bdpo", "sac"):
        runs = list(result["runs"][key].values())
        if runs:
            finals = [r["evals"][-1]["mean"] for r in runs]
            rate = np.mean([r["frames_per_s"] for r in runs])
            line = f"{key}: final return {np.mean(finals):.1f} +- {np.std(finals):.1f} over {len(runs)} seed(s), {rate:.1f} env frames/s"
            split = [r["time_s"] for r in runs if "time_s" in r]
            if split:  # the collector's share: acting and env steps, per frame
                mean = {k: np.mean([t[k] for t in split]) for k in ("collect", "update", "eval")}
                collect_ms = 1e3 * mean["collect"] / result["settings"]["frames"]
                line += f" (collection {collect_ms:.2f} ms/frame; {mean['update']:.0f} s in updates, {mean['eval']:.0f} s in evaluations)"
            print(line)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="Pendulum-v1")
    p.add_argument("--frames", type=int, default=20000)
    p.add_argument("--frames-per-batch", type=int, default=1000)
    p.add_argument("--init-random-frames", type=int, default=5000)
    p.add_argument("--utd-ratio", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=5000)
    p.add_argument("--episodes", type=int, default=5)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--algos", nargs="+", choices=("bdpo", "sac"), default=["bdpo", "sac"], help="which algorithms to run (default both)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both algorithms (default: torch's); 1 when two harnesses share 2 cores")
    p.add_argument("--bdpo", nargs="*", default=[], help="extra bdpo_online.py overrides")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR", help="join the results in these --out-dir folders instead of running")
    p.add_argument("--out-dir", default="outputs/online_vs_sac")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        try:
            return report(merge(args.merge), out)
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))
    for name in ("frames", "init_random_frames", "eval_every"):
        if getattr(args, name) % args.frames_per_batch:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a multiple of --frames-per-batch")
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads {args.threads}: expected an integer >= 1")
        torch.set_num_threads(args.threads)
        args.bdpo = [f"threads={args.threads}", *args.bdpo]
    result = run_record(args, leave_out=("out_dir", "merge"), runs={"bdpo": {}, "sac": {}})
    path = out / "online_vs_sac.json"
    for seed in args.seeds:
        if "sac" in args.algos:
            result["runs"]["sac"][str(seed)] = run_sac(args, seed)
            path.write_text(json.dumps(result, indent=1))
        if "bdpo" in args.algos:
            result["runs"]["bdpo"][str(seed)] = run_bdpo(args, seed, out / f"bdpo_seed{seed}")
            path.write_text(json.dumps(result, indent=1))
    return report(result, out)


if __name__ == "__main__":
    main()
