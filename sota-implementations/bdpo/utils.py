"""Builders and helpers shared by the BDPO scripts (models, loss, optimizers, checkpoints, plots)."""

from __future__ import annotations

import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from torchrl_bdpo.diffusion import DiffusionActor, EpsilonNetwork, make_qvalue_operator, make_reference, make_schedule, make_value_operator
from torchrl_bdpo import checkpoint as checkpoint_io
from torchrl_bdpo.ensemble import check_aggregation, check_pessimism_share
from torchrl_bdpo.diffusion.select import check_selection
from torchrl_bdpo.diffusion import networks
from torchrl_bdpo.objectives import BDPOLoss, TargetSoftUpdate
from torchrl_bdpo.provenance import software_versions
from torchrl_bdpo.speed import SpeedOptions
from torchrl_bdpo.training import BDPOUpdate


# launcher subprocesses (hydra-submitit-launcher) unpickle a script's job in a new interpreter,
# which imports this module again: the scripts' folder goes on their PYTHONPATH
_HERE = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join([_HERE, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _HERE)])

LOGGER_BACKENDS = ("csv", "tensorboard", "wandb", "mlflow", "trackio", "")

# (dotted key, kind, lower bound, upper bound): int / float / rate, inclusive bounds (None: open)
_CHECKS = (
    ("seed", "int", 0, None),
    ("diffusion.num_steps", "int", 1, None),
    ("diffusion.hidden", "int", 1, None),
    ("diffusion.depth", "int", 1, None),
    ("critic.num_qvalue_nets", "int", 1, None),
    ("critic.hidden", "int", 1, None),
    ("critic.depth", "int", 1, None),
    ("loss.eta", "float", "open0", None),
    ("loss.rho", "float", 0, None),
    ("loss.qvalue_target_rho", "float_or_null", 0, None),
    ("loss.num_samples", "int", 1, None),
    ("loss.gamma", "float", 0, 1),
    ("optim.batch_size", "int", 1, None),
    ("optim.pretrain_steps", "int", 0, None),
    ("optim.steps", "int", 0, None),
    ("optim.warmup", "int", 0, None),
    ("optim.actor_every", "int", 1, None),
    ("optim.behavior_lr", "float", "open0", None),
    ("optim.critic_lr", "float", "open0", None),
    ("optim.actor_lr", "float", "open0", None),
    ("optim.tau", "float", "open0", 1),
    ("optim.critic_tau", "float", "open0", 1),
    ("optim.grad_clip", "float_or_null", 0, None),
    ("eval.interval", "int", 0, None),
    ("eval.pretrain_interval", "int", 0, None),
    ("eval.episodes", "int", 0, None),
    ("eval.num_envs", "int", 1, None),
    ("eval.num_candidates", "int", 1, None),
    ("eval.rho", "float", 0, None),
    ("eval.max_steps", "int", 1, None),
    ("eval.num_samples", "int", 1, None),
    ("env.num_points", "int", 1, None),
    ("checkpoint.interval", "int", 1, None),
    ("logger.log_interval", "int", 1, None),
    ("compile.warmup", "int", 0, None),
)


def selection_kwargs(cfg: DictConfig) -> dict:
    """How best-of-K ranks its candidates (``eval.aggregation``, ``eval.rho``, ``eval.selection``, ``eval.num_elite``) as
    :class:`~torchrl_bdpo.diffusion.QSelectActor` keywords; the paper's argmax of the ensemble mean when unset."""
    return {
        "aggregation": OmegaConf.select(cfg, "eval.aggregation", default="mean"),
        "rho": float(OmegaConf.select(cfg, "eval.rho", default=0.0)),
        "selection": OmegaConf.select(cfg, "eval.selection", default="q"),
        "num_elite": OmegaConf.select(cfg, "eval.num_elite", default=None),
    }


def acting_rule(cfg: DictConfig) -> str:
    """The evaluation's acting rule (``eval.num_candidates`` and :func:`selection_kwargs`) in words,
    for figures and printed results: ``"best of 10 by Q"``, ``"mean of 3 candidates"``,
    ``"mean of the 5 best of 10 by Q"``; ``"by Q's lcb, rho 1"`` where the ranking is not the
    ensemble mean."""
    k = OmegaConf.select(cfg, "eval.num_candidates", default=None)
    sel = selection_kwargs(cfg)
    if k == 1:
        return "one sample"
    by = "by Q" if sel["aggregation"] == "mean" else f"by Q's {sel['aggregation']}" + (f", rho {sel['rho']:g}" if sel["aggregation"] == "lcb" else "")
    if sel["selection"] == "average":
        return f"mean of {k} candidates"
    if sel["selection"] == "elite":
        return f"mean of the {sel['num_elite']} best of {k} {by}"
    return f"best of {k} {by}"


PER_ENV = "per_env"  # a config value the budget sets per environment (its ``per_env`` table; resolve_per_env)


def per_env_paths(cfg: DictConfig) -> list[str]:
    """The dotted keys of ``cfg`` that read :data:`PER_ENV`, still to be set by :func:`resolve_per_env`."""
    return _per_env_paths(OmegaConf.to_container(cfg, resolve=False))


def _per_env_paths(node, prefix: str = "") -> list[str]:
    """The dotted keys whose value is :data:`PER_ENV` (the ``per_env`` table itself aside)."""
    paths = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            if path != "per_env":
                paths += _per_env_paths(value, path + ".")
        elif isinstance(value, str) and value == PER_ENV:
            paths.append(path)
    return paths


def check_per_env_resolved(cfg: DictConfig) -> None:
    """A ``ValueError`` that names each value still reading :data:`PER_ENV` (see :func:`resolve_per_env`)."""
    unresolved = per_env_paths(cfg)
    if unresolved:
        raise ValueError(
            "invalid config values:\n  "
            + "\n  ".join(
                f"{p}={PER_ENV!r}: expected a value; the offline script sets it from the dataset's env (resolve_per_env), or set it on the command line"
                for p in unresolved
            )
        )


def env_family(env_id: str) -> str:
    """An env id without its version or dataset level: ``"Hopper-v5"`` and ``"hopper-medium-v2"`` -> ``"hopper"``."""
    return str(env_id).rsplit("/", 1)[-1].split("-")[0].lower()


def resolve_per_env(cfg: DictConfig, env_id: str | None) -> dict:
    """Set each config value that reads ``per_env`` to the budget's value for the dataset's env.

    ``budget=cpu`` sets ``loss.rho`` and ``eval.selection`` to ``per_env``. Its ``per_env``
    table holds them under ``default`` and, where an environment family departs from it, under
    that family's name (``Hopper``, ...; matched without case or version); a family's block
    names only what it changes. The paper keeps eta and rho per task in the same way
    (docs/results/locomotion.md has what each block was measured on). A value given on the
    command line replaces the placeholder, so it wins. Returns the values set (dotted key ->
    value) and prints them with the block each came from; a placeholder that neither the env's
    block nor ``default`` covers raises a ``ValueError`` that names it.
    """
    paths = per_env_paths(cfg)
    if not paths:
        return {}
    table = OmegaConf.select(cfg, "per_env", default=None)
    if table is None:
        named = ", ".join(f"{p}={PER_ENV!r}" for p in paths)
        raise ValueError(f"{named}: expected a value; the config has no per_env table to take it from. Set each on the command line.")
    family = None if env_id is None else env_family(env_id)
    names = {str(k).lower(): k for k in table if k != "default"}
    name = names.get(family)
    values, sources = {}, {}
    for path in paths:
        for block in (name, "default"):
            value = PER_ENV if block is None or table.get(block) is None else OmegaConf.select(table[block], path, default=PER_ENV)
            if not (isinstance(value, str) and value == PER_ENV):
                break
        else:
            raise ValueError(f"{path}={PER_ENV!r}: the budget's per_env table has no value for it under {name or family!r} or 'default'; set {path}=<value>.")
        OmegaConf.update(cfg, path, value, merge=False)
        values[path], sources[path] = value, block
    said = ", ".join(f"{k}={v} ({sources[k]})" for k, v in values.items())
    print(f"per_env for {env_id!r}: {said}, from the budget's per_env table; set any of them on the command line to change it")
    return values


def validate_config(cfg: DictConfig) -> None:
    """Check every integer and rate of a script's config before anything runs.

    One ``ValueError`` lists each bad value: its name, the value and the expected range. Keys a
    config does not have are skipped. Also: ``optim.warmup`` must leave the actor steps,
    ``device=cuda`` needs CUDA, ``compile.cudagraphs`` needs a CUDA device, and
    ``logger.backend`` must be one torchrl knows.
    """
    check_per_env_resolved(cfg)
    problems = []
    for dotted, kind, lo, hi in _CHECKS:
        value = OmegaConf.select(cfg, dotted, default="<missing>")
        if isinstance(value, str) and value == "<missing>":
            continue
        if kind == "float_or_null" and value is None:
            continue
        is_int = isinstance(value, int) and not isinstance(value, bool)
        is_num = is_int or isinstance(value, float)
        if kind == "int" and not is_int:
            problems.append(f"{dotted}={value!r}: expected an integer")
            continue
        if kind != "int" and not is_num:
            problems.append(f"{dotted}={value!r}: expected a number")
            continue
        low_ok = value > 0 if lo == "open0" else (lo is None or value >= lo)
        if not low_ok or (hi is not None and value > hi):
            low = "> 0" if lo == "open0" else (f">= {lo}" if lo is not None else "")
            high = f"<= {hi}" if hi is not None else ""
            problems.append(f"{dotted}={value!r}: expected {' and '.join(x for x in (low, high) if x)}")
    o = cfg.get("optim", {})
    if isinstance(o.get("warmup"), int) and isinstance(o.get("steps"), int) and o.steps > 0 and o.warmup >= o.steps:
        problems.append(
            f"optim.warmup={o.warmup}: expected < optim.steps={o.steps}, or the actor never trains (the actor starts after warmup critic-only steps)"
        )
    rho = OmegaConf.select(cfg, "eval.rho", default=0.0)
    if any(p.startswith("eval.rho=") for p in problems):  # its type or range is listed above: check the rule alone
        rho = 0.0
    aggregation = OmegaConf.select(cfg, "eval.aggregation", default="mean")
    try:
        check_aggregation(aggregation, rho, prefix="eval.")
    except ValueError as err:
        problems.append(str(err).rstrip("."))
    try:
        check_selection(
            OmegaConf.select(cfg, "eval.selection", default="q"),
            prefix="eval.",
            aggregation=aggregation,
            rho=rho,
            num_elite=OmegaConf.select(cfg, "eval.num_elite", default=None),
            num_candidates=OmegaConf.select(cfg, "eval.num_candidates", default=None),
        )
    except ValueError as err:
        problems.append(str(err).rstrip("."))
    share = OmegaConf.select(cfg, "loss.qvalue_target_pessimism", default=None)
    if share is not None:
        try:
            check_pessimism_share(
                share, OmegaConf.select(cfg, "loss.aggregation", default="lcb"), OmegaConf.select(cfg, "loss.qvalue_target_rho", default=None), prefix="loss."
            )
        except ValueError as err:
            problems.append(str(err).rstrip("."))
    backend = OmegaConf.select(cfg, "logger.backend", default="csv")
    if backend is None:
        backend = ""
    if backend not in LOGGER_BACKENDS:
        problems.append(f"logger.backend={backend!r}: expected one of {LOGGER_BACKENDS} ('' for none)")
    device = str(cfg.get("device", "cpu"))
    try:
        dev = torch.device(device)
    except RuntimeError:
        problems.append(f"device={device!r}: expected a torch device such as cpu or cuda")
        dev = None
    if dev is not None and dev.type == "cuda" and not torch.cuda.is_available():
        problems.append(f"device={device!r}: this torch build or machine has no CUDA; use device=cpu")
    if OmegaConf.select(cfg, "compile.cudagraphs", default=False) and (dev is None or dev.type != "cuda"):
        problems.append(
            f"compile.cudagraphs=true: CUDA graphs need a CUDA device, and device={device!r}; set device=cuda on a GPU machine or compile.cudagraphs=false"
        )
    if problems:
        raise ValueError("invalid config values:\n  " + "\n  ".join(problems))


# hydra launcher plugins: the config name on the command line -> (module, pip package)
LAUNCHER_PLUGINS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "ray": ("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher"),
}


def check_launcher_plugin(argv: list[str]) -> None:
    """Exit with the pip package to install when ``hydra/launcher=<name>`` names a plugin that is
    not installed (hydra itself only says that it cannot find the config)."""
    import importlib.util

    for arg in argv:
        if arg.startswith(("hydra/launcher=", "+hydra/launcher=", "override hydra/launcher=")):
            name = arg.split("=", 1)[1]
            module, package = LAUNCHER_PLUGINS.get(name, (None, None))
            if module is not None and importlib.util.find_spec(module) is None:
                raise SystemExit(
                    f'hydra/launcher={name} needs the {package} plugin, which is not installed: pip install {package} (or pip install "torchrl_bdpo[sweep]").'
                )


def hydra_main(train, config_name: str) -> None:
    """A script's command line: the launcher check, then ``train`` under hydra with
    ``config/<config_name>.yaml`` (next to the script that defines ``train``)."""
    import hydra

    check_launcher_plugin(sys.argv[1:])
    hydra.main(config_path="config", config_name=config_name, version_base="1.3")(train)()


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


MATMUL_PRECISIONS = ("highest", "high", "medium")


def _launcher_share() -> int | None:
    """Cores per job when hydra's joblib launcher runs ``n_jobs`` jobs at once on this machine."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except Exception:  # not under hydra (a direct train(cfg) call)
        return None
    n_jobs = OmegaConf.select(hc, "launcher.n_jobs", default=None)
    if str(hc.mode) != "RunMode.MULTIRUN" or not isinstance(n_jobs, int) or n_jobs == 0:
        return None
    n_jobs = os.cpu_count() if n_jobs < 0 else n_jobs  # joblib: -1 is one job per core
    return max(1, (os.cpu_count() or 1) // n_jobs)


def set_threads(cfg: DictConfig) -> int:
    """``torch.set_num_threads(cfg.threads)`` when set (null: torch's default, every core).

    Two jobs on one machine each take every core by default and thrash; give each its share
    (``threads=1`` for two jobs on 2 cores). Under hydra's joblib launcher a null ``threads``
    is the job's share: ``cpu_count // hydra.launcher.n_jobs``. Returns the number in use.
    """
    threads = cfg.get("threads", None)
    if threads is None:
        threads = _launcher_share()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r}: expected a positive integer, or null for torch's default.")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def set_matmul_precision(cfg: DictConfig) -> str:
    """``torch.set_float32_matmul_precision(cfg.matmul_precision)``; returns the value.

    ``highest`` (torch's default): float32 matmuls in full float32. ``high``: TF32 on NVIDIA
    GPUs since Ampere, as JAX runs float32 matmuls there by default (on an H200: 573 against 368
    compiled + graphed phase-B steps/s). It changes the numbers, so it is part of the config a
    checkpoint must match. torch only warns on an unknown value; this raises.
    """
    value = cfg.get("matmul_precision", "highest")
    if value not in MATMUL_PRECISIONS:
        raise ValueError(
            f"matmul_precision={value!r}: expected one of {MATMUL_PRECISIONS}. Use 'highest' "
            f"(torch's default, full float32) or 'high' (TF32 matmuls on recent NVIDIA GPUs)."
        )
    torch.set_float32_matmul_precision(value)
    return value


def make_bdpo_loss(cfg: DictConfig, observation_dim: int, action_dim: int, qvalue_network=None, reference: str | None = None) -> BDPOLoss:
    """BDPO's loss from the config; ``qvalue_network`` replaces the Q ensemble (e.g. a known reward);
    ``reference`` (``"uniform"`` | ``"gaussian"``) replaces the behavior model by an analytic one."""
    check_per_env_resolved(cfg)
    d, c, lc = cfg.diffusion, cfg.critic, cfg.loss

    def diffusion_model():
        schedule = make_schedule(d.schedule, d.num_steps, sigma=d.sigma, final_noise=d.final_noise)
        net = EpsilonNetwork(action_dim, observation_dim, hidden=d.hidden, depth=d.depth)
        return DiffusionActor(net, schedule, clip_denoised=d.clip_denoised)

    if reference is None:
        behavior = diffusion_model()
    else:
        schedule = make_schedule(d.schedule, d.num_steps, sigma=d.sigma, final_noise=d.final_noise)
        behavior = make_reference(reference, schedule, action_dim, observation_dim, clip_denoised=d.clip_denoised)
    actor = diffusion_model()
    loss = BDPOLoss(
        actor,
        behavior,
        make_value_operator(observation_dim, action_dim, hidden=c.hidden, depth=c.depth, num_steps=d.num_steps),
        qvalue_network
        if qvalue_network is not None
        else make_qvalue_operator(observation_dim, action_dim, hidden=c.hidden, depth=c.depth, layer_norm=c.get("layer_norm", False)),
        eta=lc.eta,
        rho=lc.rho,
        aggregation=lc.aggregation,
        num_qvalue_nets=c.num_qvalue_nets,
        num_samples=lc.num_samples,
        gamma=lc.get("gamma", 0.99),
        max_q_backup=lc.get("max_q_backup", False),
        train_behavior=cfg.optim.train_behavior,
        speed=SpeedOptions(ensemble_chunk_rows=lc.get("ensemble_chunk_rows", "auto"), ensemble_chunk_compile=chunk_compile_options(cfg)),
        step_sampling=lc.get("step_sampling", "uniform"),
        qvalue_target_rho=lc.get("qvalue_target_rho"),
        qvalue_target_pessimism=lc.get("qvalue_target_pessimism"),
    )
    return loss.to(cfg.device)


def load_offline_run(run: Path, batch_size: int | None = None) -> tuple[DictConfig, object, BDPOLoss, dict]:
    """A finished ``bdpo_offline.py`` run folder as ``(cfg, buffer, loss, state)``: its config, its
    dataset's replay buffer (``batch_size`` per draw; the run's own when ``None``), the loss holding
    the checkpoint's weights and the checkpoint itself (``phase``, ``step``, ...). A folder without
    ``config.yaml`` or ``checkpoint.pt`` is refused by name."""
    from torchrl_bdpo.data import make_offline_buffer

    run = Path(run)
    for name in ("config.yaml", "checkpoint.pt"):
        if not (run / name).exists():
            raise FileNotFoundError(f"{run}: no {name}; pass the folder of a bdpo_offline.py run (it holds config.yaml and checkpoint.pt)")
    cfg = OmegaConf.load(run / "config.yaml")
    buffer = make_offline_buffer(cfg.env.dataset, batch_size or cfg.optim.batch_size, reward_mode=cfg.env.reward_mode)
    info = buffer.dataset_info
    loss = make_bdpo_loss(cfg, info.observation_dim, info.action_dim)
    state = checkpoint_io.load_checkpoint(run / "checkpoint.pt")
    loss.load_state_dict(state["loss"])
    return cfg, buffer, loss, state


def load_online_run(run: Path) -> tuple[DictConfig, BDPOLoss, dict]:
    """A ``bdpo_online.py`` run folder as ``(cfg, loss, state)``: its config, the loss holding the
    checkpoint's weights at the checkpoint's eta, and the checkpoint itself (``frames``, the
    online replay under ``replay``, ...). A folder without ``config.yaml`` or ``checkpoint.pt``,
    or a checkpoint with an empty replay, is refused by name."""
    run = Path(run)
    for name in ("config.yaml", "checkpoint.pt"):
        if not (run / name).exists():
            raise FileNotFoundError(f"{run}: no {name}; pass the folder of a bdpo_online.py run (it holds config.yaml and checkpoint.pt)")
    cfg = OmegaConf.load(run / "config.yaml")
    state = checkpoint_io.load_checkpoint(run / "checkpoint.pt")
    data = state["replay"]["data"]
    if data is None:
        raise ValueError(
            f"{run}/checkpoint.pt: its online replay is empty; it sets the observation and action dims. Pass a checkpoint written after collection."
        )
    reference = cfg.reference if cfg.mode == "online" else None
    loss = make_bdpo_loss(cfg, data["observation"].shape[-1], data["action"].shape[-1], reference=reference)
    loss.load_state_dict(state["loss"])
    if state.get("eta_value") is not None:
        loss.set_eta(state["eta_value"])
    return cfg, loss, state


def chunk_compile_options(cfg: DictConfig) -> dict | None:
    """The loss's ``speed.ensemble_chunk_compile``: compiled steps without CUDA graphs run the ensembles'
    row chunks (CPU) through one compiled graph each, with the steps' own compile mode."""
    c = cfg.get("compile", {})
    if not c.get("compile", False) or c.get("cudagraphs", False):
        return None
    return {} if c.get("mode") is None else {"mode": c.get("mode")}


def make_optimizers(cfg: DictConfig, loss: BDPOLoss) -> dict:
    """Adam per group, fused: one kernel per step (CPU: -16% per behavior step here; GPU: far
    fewer kernels than the foreach default, CUDA-graph safe)."""
    o = cfg.optim
    groups = BDPOUpdate.param_groups(loss)  # critic: Q's then V's parameters
    lrs = {"behavior": o.behavior_lr, "critic": o.critic_lr, "actor": o.actor_lr}
    # an analytic reference (online: the uniform policy) has no parameters and no optimizer
    return {g: torch.optim.Adam(groups[g], lr=lrs[g], fused=True) for g in ("behavior", "critic", "actor") if groups[g]}


def make_schedulers(cfg: DictConfig, optimizers: dict) -> dict:
    """Cosine learning-rate decays, each stepped once per optimizer step of its group.

    The critics' reaches 0 at the end of phase B. The actor's reaches 0 after
    ``optim.actor_lr_decay_steps`` actor steps: the authors' code sets that horizon to the
    number of phase-B steps while its schedule counts actor steps only, so at the paper's
    settings (2M steps, an actor step every 5th after 50k) the actor's rate ends at ~0.91x
    its start; ``null`` takes the actor's own number of steps instead (decay to 0 at the end).
    """
    o = cfg.optim
    actor_steps = max(1, (o.steps - o.warmup + o.actor_every - 1) // o.actor_every)
    horizon = o.get("actor_lr_decay_steps", None)
    if horizon is None:
        horizon = actor_steps
    elif isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(
            f"optim.actor_lr_decay_steps={horizon!r}: expected a positive integer (actor steps until "
            f"the actor's cosine learning rate reaches 0; the authors' code: ${{optim.steps}}) or null "
            f"(the actor's own number of steps, {actor_steps} here)."
        )
    elif horizon < actor_steps:
        raise ValueError(
            f"optim.actor_lr_decay_steps={horizon} is below the run's {actor_steps} actor steps: "
            f"torch's CosineAnnealingLR would raise the rate again after reaching 0. Set it to at "
            f"least {actor_steps}, or null."
        )
    return {
        "critic": torch.optim.lr_scheduler.CosineAnnealingLR(optimizers["critic"], max(1, o.steps)),
        "actor": torch.optim.lr_scheduler.CosineAnnealingLR(optimizers["actor"], horizon),
    }


def make_updaters(cfg: DictConfig, loss: BDPOLoss) -> dict:
    updaters = {
        "critic": TargetSoftUpdate(loss, ("qvalue_network", "value_network"), cfg.optim.critic_tau),
        "actor": TargetSoftUpdate(loss, ("actor_network",), cfg.optim.tau),
    }
    if BDPOUpdate.param_groups(loss)["behavior"]:  # not for an analytic reference
        updaters["behavior"] = TargetSoftUpdate(loss, ("behavior_network",), cfg.optim.tau)
    return updaters


def hand_over(loss: BDPOLoss) -> None:
    """Actor and actor target start as copies of the behavior EMA (``BDPOLoss.init_actor_from_behavior``)."""
    loss.init_actor_from_behavior()


def make_update(cfg: DictConfig, loss: BDPOLoss, optimizers: dict, updaters: dict) -> BDPOUpdate:
    """The optimizer steps, eager / compiled / CUDA-graphed as ``cfg.compile`` says.

    ``compile.overlap_losses: null`` (the default) runs each step's two losses on two CUDA
    streams when the steps are CUDA graphs (an H100 measured 1.19-1.20x more phase-B steps/s
    that way: benchmarks/README.md) and on one stream otherwise; true or false forces it.
    ``compile.fuse_narrow_linear`` is set on the loss's networks before anything compiles
    (``torchrl_bdpo.diffusion.networks.set_fuse_narrow_linear``): false (the default: GEMMs
    everywhere), or, experimental (0.98x the GEMMs on an H200), cuda (compiled GPU steps write the
    networks' maps with at most 8 inputs or outputs as fused sums) or true (on a CPU too).
    """
    c = cfg.get("compile", {})
    fuse = c.get("fuse_narrow_linear", False)
    try:
        networks.check_fuse_narrow(fuse)
    except ValueError:
        raise ValueError(
            f"compile.fuse_narrow_linear={fuse!r}: expected false (the default: GEMMs), or, "
            f"experimental, cuda (fused sums in compiled GPU steps) or true (every device)."
        ) from None
    networks.set_fuse_narrow_linear(loss, fuse)
    cudagraphs = c.get("cudagraphs", False)
    overlap = c.get("overlap_losses", None)
    if overlap is None:
        overlap = bool(cudagraphs)
    elif not isinstance(overlap, bool):
        raise ValueError(f"compile.overlap_losses={overlap!r}: expected true, false or null (null: on with compile.cudagraphs=true).")
    return BDPOUpdate(
        loss,
        optimizers,
        updaters,
        grad_clip=cfg.optim.grad_clip or None,
        compile=c.get("compile", False),
        compile_mode=c.get("mode", None),
        cudagraphs=cudagraphs,
        warmup=c.get("warmup", 2),
        overlap_losses=overlap,
    )


def pretrain_step(update: BDPOUpdate, batch, step: int, checkpoint: Path | None):
    """Phase A: one behavior step; stops on a non-finite loss. Returns the step's TensorDict."""
    out = update.behavior(batch)
    check_finite_loss("loss_behavior", out["loss_behavior"], step, checkpoint)
    return out


def train_step(update: BDPOUpdate, schedulers: dict, batch, step: int, optim_cfg, checkpoint: Path | None):
    """Phase B: the critic step every step, the actor + behavior step every ``actor_every``-th after ``warmup``.

    Stops on a non-finite loss (naming the step and the last checkpoint). Returns ``(row,
    critic)``: the step's losses as floats, and the critic step's TensorDict for diagnostics.
    """
    o = optim_cfg
    critic = update.critic(batch)
    check_finite_loss("loss_qvalue + loss_value", critic["loss_qvalue"] + critic["loss_value"], step, checkpoint)
    schedulers["critic"].step()
    row = {"loss_qvalue": critic["loss_qvalue"].item(), "loss_value": critic["loss_value"].item()}
    if step >= o.warmup and (step - o.warmup) % o.actor_every == 0:
        policy = update.policy(batch)
        check_finite_loss("loss_actor", policy["loss_actor"], step, checkpoint)
        schedulers["actor"].step()
        row.update({k: v.item() for k, v in policy.items() if not k.startswith("grad_norm")})
    return row, critic


# the critic step's entries logged with each phase-B log row, where the step has them; the
# Q-target paths' entries only where next states have paths
CRITIC_DIAGNOSTICS = ("qvalue_pred", "value_pred", "value_target", "value_step_kl", "grad_norm_qvalue", "grad_norm_value")
PATH_DIAGNOSTICS = ("qvalue_target", "qvalue_target_rho", "path_kl")


def _probe_rows(episodes, reward_scale: float, gamma: float, next_penalty=None, device=None, chunk: int = 4096):
    """The evaluation ``episodes`` in one TensorDict, rewards scaled, with each step's discounted
    return-to-go (``mc``), and the mask of the steps whose return a time limit did not cut.

    With ``next_penalty`` (``next_observation -> [rows]``, in scaled-reward units) also
    ``mc_soft``: the return-to-go of ``r_t - gamma * next_penalty(s_{t+1})`` (no penalty where
    ``s_{t+1}`` is terminal), the soft return a critic whose TD target subtracts that term
    estimates. It reads ``("next", "observation")``, ``chunk`` rows at a time on ``device``.
    """
    from torchrl_bdpo.data import discounted_returns, exact_return_mask

    rows = []
    for i, ep in enumerate(episodes):
        ep = ep.clone()
        ep.set(("next", "reward"), ep.get(("next", "reward")).float() * reward_scale)
        ep.set("episode", torch.full((ep.shape[0],), i, dtype=torch.long))
        rows.append(ep)
    data = torch.cat(rows)
    data.set("mc", discounted_returns(data, gamma).float())
    if next_penalty is not None:
        _set_soft_returns(data, gamma, next_penalty, device, chunk)
    return data, exact_return_mask(data, gamma)


def _set_soft_returns(data, gamma: float, next_penalty, device, chunk: int = 4096) -> None:
    """Sets ``mc_soft`` on the rows of :func:`_probe_rows` (see there)."""
    from torchrl_bdpo.data import discounted_returns

    if ("next", "observation") not in data.keys(True):
        raise KeyError(
            "the soft return needs each step's ('next', 'observation'); pass episodes from torchrl_bdpo.envs.evaluate(..., keep_episodes=True), which keep it."
        )
    next_obs = data.get(("next", "observation")).float()
    with torch.no_grad():
        penalty = torch.cat([next_penalty(o.to(device)).reshape(-1).float().cpu() for o in next_obs.split(chunk)])
    reward = data.get(("next", "reward"))
    live = ~data.get(("next", "terminated")).reshape(-1)
    soft = data.clone(False)
    soft.set(("next", "reward"), reward - gamma * (penalty * live).reshape(reward.shape))
    data.set("mc_soft", discounted_returns(soft, gamma).float())


def _spread(td, max_rows: int):
    """At most ``max_rows`` rows of ``td``, spread evenly over it (over the episodes)."""
    return td[torch.linspace(0, td.shape[0] - 1, max_rows).long()] if td.shape[0] > max_rows else td


def _q_rows(q_fn, data, exact, device, max_rows: int) -> dict:
    fair = _spread(data[exact], max_rows)
    out = {"policy_probe_states": int(fair.shape[0])}
    if fair.shape[0]:
        with torch.no_grad():
            q = q_fn(fair.get("observation").to(device).float(), fair.get("action").to(device).float())
        out.update(q_policy=float(q.mean()), mc_return_policy=float(fair.get("mc").mean()))
        if "mc_soft" in fair.keys():
            out["mc_soft_return_policy"] = float(fair.get("mc_soft").mean())
    return out


def q_policy_probe(q_fn, episodes, reward_scale: float, gamma: float, device, max_rows: int = 2048, next_penalty=None) -> dict:
    """Q on the policy's own actions against their Monte Carlo return, for any critic.

    ``q_fn(observation, action)`` gives Q per row (any shape whose mean is the batch's mean Q).
    Over the steps of evaluation ``episodes`` (from :func:`evaluate`) whose return a time limit
    did not cut (:func:`exact_return_mask`: the episode fell, or more than the horizon,
    gamma^k <= 0.01, was left): ``q_policy``, Q's mean on the (s, a) the policy took;
    ``mc_return_policy``, the discounted return that followed (rewards times ``reward_scale``,
    as in training); ``policy_probe_states``, how many steps. Where no step's return is exact
    (every episode ran to its time limit with less than the horizon left: at gamma 0.999 a
    1000-step episode) only the count (0) is returned. Overestimation on the policy's actions
    (not only on the data's) is how a policy that exploits Q errors shows.

    A soft critic (its TD target subtracts ``gamma * next_penalty(s')``: SAC's
    ``alpha * log pi(a'|s')``, BDPO's ``eta * path KL(s')``) estimates the soft return, not the
    raw one: ``next_penalty`` adds ``mc_soft_return_policy``, the same steps' return of the
    penalised rewards (docs/design.md section 1). The probe draws only what ``next_penalty``
    draws.
    """
    if not episodes:
        return {}
    data, exact = _probe_rows(episodes, reward_scale, gamma, next_penalty, device)
    return _q_rows(q_fn, data, exact, device, max_rows)


def bdpo_next_penalty(loss):
    """``next_observation -> eta * path KL``: what BDPO's Q target subtracts (over ``gamma``) at
    the next state, the target actor's path KL to the reference (one draw of its ``num_samples``
    paths per state) times the current eta."""
    eta = float(loss.eta)

    def penalty(obs):
        none_terminal = torch.zeros(obs.shape[0], dtype=torch.bool, device=obs.device)
        return eta * loss.next_state_value(obs, none_terminal, reward=obs.new_zeros(obs.shape[0]))[1]

    return penalty


def policy_value_probe(loss, episodes, reward_scale: float, gamma: float, device, max_rows: int = 2048) -> dict:
    """:func:`q_policy_probe` with BDPO's target Q ensemble (its mean), the soft return of
    :func:`bdpo_next_penalty` and the path KL per state.

    ``path_kl_mean`` / ``path_kl_p90``: the target actor's path KL to the reference (nats), at
    every state of the evaluation ``episodes`` (at most ``max_rows``, spread over them): the
    behavior EMA offline, the uniform policy online.

    It draws the path KL's paths from torch's generator; a caller that must not move the
    training's random stream (the online script, whose evaluations sit between collections)
    wraps it in ``torch.random.fork_rng``. The soft return's paths (at every next state) draw on
    a fork of their own, so they leave the caller's stream where the path KL left it.
    """
    if not episodes:
        return {}
    data, exact = _probe_rows(episodes, reward_scale, gamma)
    out = {}
    with torch.no_grad():
        states = _spread(data, max_rows).get("observation").to(device).float()
        # only the paths' KL is read: the value (and an adaptive weight's reward) does not matter
        none_terminal = torch.zeros(states.shape[0], dtype=torch.bool, device=device)
        _, path_kl, _ = loss.next_state_value(states, none_terminal, reward=states.new_zeros(states.shape[0]))
    out.update(path_kl_mean=float(path_kl.mean()), path_kl_p90=float(path_kl.quantile(0.9)))
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        _set_soft_returns(data, gamma, bdpo_next_penalty(loss), device)
    out.update(_q_rows(lambda s, a: loss._qvalue(loss.target_qvalue_network_params, s, a), data, exact, device, max_rows))
    return out


def plot_probe_returns(ax, x, rows, color: str, suffix: str = "", who: str = "") -> None:
    """The probe's returns on ``ax`` (the row keys ending in ``suffix``; ``who`` tags the labels):
    the soft MC return (what a soft Q estimates; dashed) where the rows have it, and the raw one
    (dotted, fainter): Q is to be read against the soft one."""
    if all(f"mc_soft_return_policy{suffix}" in r for r in rows):
        ax.plot(x, [r[f"mc_soft_return_policy{suffix}"] for r in rows], ls="--", marker=".", color=color, alpha=0.6, label=f"their soft MC return{who}")
        ax.plot(x, [r[f"mc_return_policy{suffix}"] for r in rows], ls=":", color=color, alpha=0.35, label=f"their raw MC return{who}")
    else:
        ax.plot(x, [r[f"mc_return_policy{suffix}"] for r in rows], ls="--", marker=".", color=color, alpha=0.5, label=f"their MC return{who}")


def train_scalars(row: dict, critic, steps_per_s: float, next_state_paths: bool = True) -> dict:
    """The scalars of a phase-B log row: the step's losses (``row``), the critic step's
    diagnostics, the Q-target paths' KL at each diffusion step (``train/kl_step_<n>``, when
    ``next_state_paths``) and the steps/s since the previous row.

    The toy bandits pass ``next_state_paths=False``: every transition is terminal, their Q
    target is the reward and no path is sampled, so the path entries would log zeros.
    """
    names = CRITIC_DIAGNOSTICS + PATH_DIAGNOSTICS if next_state_paths else CRITIC_DIAGNOSTICS
    scalars = {f"train/{k}": v for k, v in row.items()}
    scalars.update({f"train/{k}": critic[k].item() for k in names if k in critic.keys()})
    if next_state_paths and "kl_per_step" in critic.keys():
        kl = critic["kl_per_step"]
        scalars.update({f"train/kl_step_{n + 1}": kl[n].item() for n in range(kl.numel())})
    scalars["train/steps_per_s"] = steps_per_s
    return scalars


def run_phases(
    cfg: DictConfig,
    loss,
    update,
    optimizers: dict,
    schedulers: dict,
    buffer,
    logger,
    out_dir: Path,
    phase: str,
    step: int,
    *,
    start: float,
    evaluate=None,
    extra_state=None,
    global_steps: bool = True,
    next_state_paths: bool = True,
) -> list[dict]:
    """The training loop of the offline and toy scripts: phase A, the hand-over, phase B.

    Phase A trains the behavior model for ``optim.pretrain_steps``; the actor then starts as its
    EMA (``hand_over``); phase B runs ``train_step`` for ``optim.steps`` (docs/design.md
    section 4). Starts at ``(phase, step)`` (a resumed checkpoint's). Logs every
    ``logger.log_interval`` steps, checkpoints every ``checkpoint.interval`` steps (after the
    finiteness check; ``extra_state()`` adds entries, e.g. the evaluations), at the hand-over and
    at the end; ``start`` (:func:`run_start`) dates the checkpoints' ``elapsed_s``. Batches come
    from ``buffer.sample()``, moved to ``cfg.device``. ``evaluate(phase, step, global_step)``
    returns an evaluation row (or None) and runs every ``eval.pretrain_interval`` phase-A and
    ``eval.interval`` phase-B steps, and on the final policy. Phase-B rows log at
    ``pretrain_steps + step`` with ``global_steps``, else on their own axis. Returns the phase-B
    rows.
    """
    o, e = cfg.optim, cfg.get("eval", {})
    ckpt = out_dir / "checkpoint.pt"
    written = [ckpt if ckpt.exists() else None]
    device = torch.device(cfg.device)

    def sample():
        return buffer.sample().to(device)

    def checkpoint(phase_name: str, next_step: int) -> None:
        check_state_before_saving(loss, sample, phase_name, next_step, written[0])
        state = training_state(loss, optimizers, schedulers, phase_name, next_step, cfg, start)
        state.update(extra_state() if extra_state is not None else {})
        save_checkpoint(ckpt, state)
        written[0] = ckpt

    def run_eval(phase_name: str, step_: int, global_step: int, bar) -> None:
        row = evaluate(phase_name, step_, global_step) if evaluate is not None else None
        if row:
            bar.set_postfix(eval_return=f"{row['return_mean']:.0f}")

    if phase == "pretrain":
        bar = tqdm(range(step, o.pretrain_steps), desc="phase A (behavior)", initial=step, total=o.pretrain_steps)
        for step in bar:
            out = pretrain_step(update, sample(), step, written[0])
            if step % cfg.logger.log_interval == 0:
                log_scalars(logger, {"pretrain/loss_behavior": out["loss_behavior"].item()}, step)
            if e.get("pretrain_interval") and (step + 1) % e.pretrain_interval == 0:
                run_eval("pretrain", step + 1, step + 1, bar)
            if (step + 1) % cfg.checkpoint.interval == 0:
                checkpoint("pretrain", step + 1)
        hand_over(loss)
        step = 0
        checkpoint("train", 0)

    offset = o.pretrain_steps if global_steps else 0
    history = []
    tic, tic_step = time.perf_counter(), step
    bar = tqdm(range(step, o.steps), desc="phase B (BDPO)", initial=step, total=o.steps)
    for step in bar:
        row, critic = train_step(update, schedulers, sample(), step, o, written[0])
        history.append(row)
        if step % cfg.logger.log_interval == 0:
            now = time.perf_counter()
            rate = (step - tic_step) / max(now - tic, 1e-9) if step > tic_step else float("nan")
            tic, tic_step = now, step
            log_scalars(logger, train_scalars(row, critic, rate, next_state_paths), offset + step)
        if e.get("interval") and (step + 1) % e.interval == 0:
            run_eval("train", step + 1, offset + step + 1, bar)
        if (step + 1) % cfg.checkpoint.interval == 0:
            checkpoint("train", step + 1)
    if o.steps > 0:
        if not (e.get("interval") and o.steps % e.interval == 0):
            run_eval("train", o.steps, offset + o.steps, bar)  # the final policy is always evaluated
        checkpoint("train", o.steps)
    return history


def check_finite_loss(name: str, value: torch.Tensor, step: int, checkpoint: Path | None) -> None:
    if not torch.isfinite(value).all():
        where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        raise FloatingPointError(
            f"{name} became {value.item()} at step {step}; training stopped and nothing was overwritten ({where}). Lower the learning rates or check the data."
        )


def check_state_before_saving(loss, sample_batch, phase: str, step: int, checkpoint: Path | None) -> None:
    """Refuse to checkpoint a diverged state: every parameter and buffer of ``loss`` must be
    finite, and so must the phase's losses on a fresh batch (``sample_batch()``).

    A step's loss is checked before its update, so the update that diverges is seen only by
    the next step; without this, a checkpoint written in between would hold the diverged
    parameters. Runs under a forked RNG: the training stream is the same with or without it.
    """
    bad = [k for k, v in loss.state_dict().items() if torch.is_floating_point(v) and not torch.isfinite(v).all()]
    losses = {}
    if not bad:
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            batch = sample_batch()
            methods = ("behavior_loss",) if phase == "pretrain" else ("qvalue_loss", "value_loss", "actor_loss")
            for name in methods:
                value = getattr(loss, name)(batch)[0]
                if not torch.isfinite(value).all():
                    losses[name] = value.item()
    if bad or losses:
        where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        what = f"non-finite entries {bad[:5]}" if bad else f"non-finite losses {losses}"
        raise FloatingPointError(
            f"the state after {phase} step {step} holds {what}: training diverged, and the checkpoint "
            f"was not written ({where}). Resume from it with lower learning rates (optim.*_lr may "
            f"change on resume), or check the data."
        )


# ---------------------------------------------------------------- checkpoints
# what may change when a run resumes: where it writes and logs, how it compiles (no number
# changes), how it evaluates, the learning rates (the advice after a divergence), and the
# budget's per_env table (its values for the run's env are in the keys it set, which must match)
RESUMABLE = ("output_dir", "checkpoint", "logger", "compile", "eval", "threads", "per_env")
LEARNING_RATES = ("behavior_lr", "critic_lr", "actor_lr")


def _prune(c: dict) -> dict:
    c = {k: v for k, v in c.items() if k not in RESUMABLE}
    if isinstance(c.get("optim"), dict):
        c["optim"] = {k: v for k, v in c["optim"].items() if k not in LEARNING_RATES}
    return c


def config_fingerprint(cfg: DictConfig) -> dict:
    """The config minus the keys that may change on resume (:data:`RESUMABLE`, the learning rates)."""
    return _prune(OmegaConf.to_container(cfg, resolve=True))


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic and durable (temporary file, fsync, rename): :func:`torchrl_bdpo.checkpoint.save_checkpoint`."""
    checkpoint_io.save_checkpoint(path, state)


def run_start(resume_state: dict | None) -> float:
    """The run's start on this process's ``time.perf_counter()`` clock: now, moved back by the
    seconds a resumed checkpoint had already trained (``elapsed_s``), so that wall times and
    rates in ``summary.json`` cover the whole run, not only the last process."""
    return time.perf_counter() - float((resume_state or {}).get("elapsed_s", 0.0))


def training_state(loss, optimizers, schedulers, phase: str, step: int, cfg, start: float) -> dict:
    """What a checkpoint holds; ``start`` is :func:`run_start`'s, for ``elapsed_s``."""
    return {
        "loss": loss.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
        "phase": phase,
        "step": step,
        "config": config_fingerprint(cfg),
        "learning_rates": {k: float(cfg.optim[k]) for k in LEARNING_RATES if k in cfg.optim},
        "rng": checkpoint_io.rng_states(),
        "elapsed_s": time.perf_counter() - start,
    }


# keys added to the configs after checkpoints were first written, with the value that those
# checkpoints' runs used: a checkpoint without the key matches a config that has this value
_LATER_KEYS = {"matmul_precision": "highest", "loss.step_sampling": "uniform", "loss.qvalue_target_rho": None, "loss.qvalue_target_pessimism": None}


def _with_later_keys(saved: dict) -> dict:
    """A checkpoint's config with the :data:`_LATER_KEYS` it lacks (dotted keys nest)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for dotted, value in _LATER_KEYS.items():
        *parents, leaf = dotted.split(".")
        node = out
        for name in parents:
            if not isinstance(node.get(name), dict):
                break
            node = node[name]
        else:
            node.setdefault(leaf, value)
    return out


def read_checkpoint(path: Path, cfg) -> dict:
    """The checkpoint at ``path`` (``weights_only``), refused with the differing keys when it was
    made with another config. Reads and checks only: nothing is loaded into a model."""
    state = checkpoint_io.load_checkpoint(path)
    mine, theirs = config_fingerprint(cfg), _prune(_with_later_keys(state["config"]))
    if mine != theirs:
        diff = _diff_keys(mine, theirs)
        raise ValueError(
            f"checkpoint {path} was made with another config; differing keys: {diff}. Resume with "
            f"the same settings, or start a fresh run (checkpoint.resume=false) in a new directory."
        )
    return state


def load_checkpoint(path: Path | dict, cfg, loss, optimizers, schedulers) -> tuple[str, int]:
    """Load a checkpoint (a path, or a state from :func:`read_checkpoint`) into the run.

    Learning rates in ``cfg`` that differ from the checkpoint's replace them: each group's
    rate and its cosine schedule are rescaled by new / old, so the decay goes on from the
    same point at the new height.
    """
    state = read_checkpoint(path, cfg) if not isinstance(path, dict) else path
    loss.load_state_dict(state["loss"])
    for k, o in optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    for k, s in schedulers.items():
        s.load_state_dict(state["schedulers"][k])
    saved_lrs = state.get("learning_rates", {})
    for group, optimizer in optimizers.items():
        key = f"{group}_lr"
        old, new = saved_lrs.get(key), cfg.optim.get(key)
        if old is None or new is None or float(old) == float(new):
            continue
        if not old > 0:
            raise ValueError(f"optim.{key}: the checkpoint's rate is {old}, which cannot be rescaled to {new}.")
        ratio = float(new) / float(old)
        for pg in optimizer.param_groups:
            pg["lr"] = pg["lr"] * ratio
            if "initial_lr" in pg:
                pg["initial_lr"] = pg["initial_lr"] * ratio
        if group in schedulers:
            sched = schedulers[group]
            sched.base_lrs = [b * ratio for b in sched.base_lrs]
            sched._last_lr = [pg["lr"] for pg in optimizer.param_groups]
        print(f"optim.{key}: {old} in the checkpoint, {new} now: the rate and its schedule rescaled by {ratio:g}")
    checkpoint_io.set_rng_states(state["rng"])
    return state["phase"], state["step"]


def resume_phases(
    resume_state: dict | None, cfg: DictConfig, loss, optimizers: dict, schedulers: dict, out_dir: Path, *, global_steps: bool = True
) -> tuple[str, int]:
    """Where a two-phase run (:func:`run_phases`) starts: ``("pretrain", 0)``, or, resuming, the
    checkpoint's phase and step, with its state loaded and the CSV log rows after that step
    dropped (logged on one global step axis, or on each phase's own with ``global_steps=False``)."""
    if resume_state is None:
        return "pretrain", 0
    phase, step = load_checkpoint(resume_state, cfg, loss, optimizers, schedulers)
    if global_steps:
        truncate_csv_logs(out_dir / "logs", step if phase == "pretrain" else cfg.optim.pretrain_steps + step)
    else:
        truncate_csv_logs(out_dir / "logs", step, only=phase)
    print(f"resumed from {out_dir / 'checkpoint.pt'}: phase {phase}, step {step}")
    return phase, step


def open_run(cfg: DictConfig, out_dir: Path) -> dict | None:
    """Set up a run's folder; with ``checkpoint.resume``, the checkpoint state to resume from.

    Before anything is written: a ``.tmp`` left by a crash mid-write is removed, and a
    checkpoint of another config is refused (its ``config.yaml`` stays as it was). A resume
    whose folder holds no checkpoint, while a sibling folder holds one of the same config
    (hydra gives each launch a new timestamped folder), fails and names it: resume there with
    ``hydra.run.dir=<that folder>``. With no such run anywhere it starts fresh.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "checkpoint.pt"
    if checkpoint_io.remove_stale_tmp(ckpt):
        print(f"removed {checkpoint_io.tmp_path(ckpt)}, a checkpoint write that did not finish")
    state = None
    if cfg.checkpoint.resume:
        if ckpt.exists():
            state = read_checkpoint(ckpt, cfg)
        else:
            mine = config_fingerprint(cfg)
            found = []
            for other in sorted(out_dir.parent.glob("*/checkpoint.pt"), key=lambda p: p.stat().st_mtime, reverse=True):
                try:
                    same = config_fingerprint(OmegaConf.load(other.parent / "config.yaml")) == mine
                except Exception:
                    same = False
                if same and other.parent != out_dir:
                    found.append(str(other.parent))
            if found:
                raise FileNotFoundError(
                    f"checkpoint.resume=true, but {out_dir} holds no checkpoint: each launch writes to a new "
                    f"folder. Runs of this config with a checkpoint, newest first: {found[:3]}. Resume one "
                    f"with hydra.run.dir=<folder> (e.g. hydra.run.dir={found[0]}), or drop checkpoint.resume."
                )
            print(f"checkpoint.resume=true: no checkpoint of this config in {out_dir.parent}; starting fresh")
    OmegaConf.save(cfg, out_dir / "config.yaml")
    return state


def start_run(cfg: DictConfig, finished=None) -> tuple[Path, dict | None, dict | None]:
    """What every script does before its first step, in an order that writes nothing until the
    config is checked: validate it, set the matmul precision and the threads, open the run's
    folder (:func:`open_run`), and seed. ``finished(resume_state)`` says whether a resumed
    checkpoint is at the run's last step (``None``: a two-phase run's, phase B's last step). Returns ``(out_dir, resume_state, summary)``; the
    summary of a finished run is not None, and the script returns it without training.
    """
    warnings.filterwarnings("ignore", message="No target network updater")
    validate_config(cfg)  # every integer and rate, before anything runs or is written
    out_dir = Path(cfg.output_dir)
    set_matmul_precision(cfg)
    set_threads(cfg)
    resume_state = open_run(cfg, out_dir)  # refuses a checkpoint of another config before writing
    if finished is None:

        def finished(state):
            return (state["phase"], state["step"]) == ("train", cfg.optim.steps)

    summary = finished_summary(out_dir, resume_state, resume_state is not None and finished(resume_state))
    if summary is None:
        set_seed(cfg.seed)
    return out_dir, resume_state, summary


def make_training(cfg: DictConfig, loss: BDPOLoss, *, constant_lr: bool = False) -> tuple[dict, dict, BDPOUpdate]:
    """The optimizers, their learning-rate schedules (cosine, or constant with ``constant_lr``:
    online) and the update (:func:`make_update`) of ``loss``."""
    optimizers = make_optimizers(cfg, loss)
    if constant_lr:  # ConstantLR(factor 1) keeps train_step's scheduler calls
        schedulers = {k: torch.optim.lr_scheduler.ConstantLR(optimizers[k], factor=1.0, total_iters=0) for k in ("critic", "actor")}
    else:
        schedulers = make_schedulers(cfg, optimizers)
    return optimizers, schedulers, make_update(cfg, loss, optimizers, make_updaters(cfg, loss))


def finished_summary(out_dir: Path, resume_state: dict | None, done: bool) -> dict | None:
    """The summary of a run that already finished (``done``: its checkpoint is at the last step),
    so that rerunning a sweep with ``checkpoint.resume=true`` skips the finished jobs."""
    path = out_dir / "summary.json"
    if resume_state is None or not done or not path.exists():
        return None
    print(f"{out_dir} finished already (its checkpoint is at the last step, summary.json written): skipped")
    return {**json.loads(path.read_text()), "history": []}  # no step ran in this call


def truncate_csv_logs(log_dir: Path, global_step: int, only: str | None = None) -> int:
    """Drop the CSV log rows a resumed run will write again; returns how many were dropped.

    Rows logged at steps after ``global_step`` go, and rows at ``global_step`` itself except
    evaluations (logged just before the checkpoint they belong to). ``only``: the files of
    that log group alone (e.g. ``"train"``, where phases count steps apart).
    """
    dropped = 0
    for path in Path(log_dir).rglob("*.csv"):
        parts = path.relative_to(log_dir).parts
        if only is not None and only not in parts:
            continue
        keep_equal = "eval" in parts
        lines = path.read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                step = float(line.split(",", 1)[0])
            except ValueError:  # a header
                kept.append(line)
                continue
            if step < global_step or (keep_equal and step == global_step):
                kept.append(line)
        if len(kept) != len(lines):
            dropped += len(lines) - len(kept)
            path.write_text("".join(kept))
    return dropped


def _diff_keys(a, b, prefix="") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        name = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += _diff_keys(a[k], b[k], name + ".")
        elif a.get(k) != b.get(k):
            keys.append(f"{name} ({b.get(k)!r} in the checkpoint, {a.get(k)!r} now)")
    return keys


def make_logger(cfg: DictConfig, output_dir: Path):
    if not cfg.logger.backend:
        return None
    from torchrl.record.loggers import get_logger

    return get_logger(cfg.logger.backend, logger_name=str(output_dir / "logs"), experiment_name=cfg.logger.exp_name)


def log_scalars(logger, values: dict, step: int) -> None:
    if logger is None:
        return
    for k, v in values.items():
        v = float(v)
        if np.isfinite(v):
            logger.log_scalar(k, v, step=step)


def write_summary(out_dir: Path, cfg: DictConfig, start: float, **fields) -> dict:
    """``summary.json``: the resolved config, ``fields``, the wall time since ``start``
    (``time.perf_counter()``), the torch threads and the software versions and CPU
    (:func:`torchrl_bdpo.provenance.software_versions`). Returns it."""
    summary = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        **fields,
        "wall_time_s": time.perf_counter() - start,
        "threads": torch.get_num_threads(),
        "software": software_versions(),  # the same seed gives the same numbers on the same software and CPU only
    }
    write_json(out_dir / "summary.json", summary)
    return summary


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float))
