"""Make D4RL-style Minari datasets for a Gymnasium MuJoCo task with TorchRL's SAC.

    python sota-implementations/bdpo/make_dataset.py env_id=Hopper-v5 levels=[random,medium,medium-replay]

Rerun the same command to resume after an interruption (checkpoint in out_dir). The
datasets are read back with ``make_offline_buffer("generated/hopper/medium-v0")`` or by
``bdpo_offline.py env.dataset=generated/hopper/medium-v0``.
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig, OmegaConf

from torchrl_bdpo.data.generate import GenerateConfig, generate


def config_from(cfg: DictConfig) -> GenerateConfig:
    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("hydra", None)
    fields = set(GenerateConfig.__dataclass_fields__)
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown settings {unknown}; expected some of {sorted(fields)}.")
    values["levels"] = tuple(values["levels"])
    values["medium_band"] = tuple(values["medium_band"])
    values["weak_band"] = tuple(values["weak_band"])
    return GenerateConfig(**values)


@hydra.main(config_path="config", config_name="make_dataset", version_base="1.3")
def main(cfg: DictConfig) -> None:
    summary = generate(config_from(cfg))
    short = {k: summary[k] for k in ("ref_min_score", "ref_max_score", "weak_policy", "medium_policy", "sac_frames", "timings_s")}
    print(json.dumps(short, indent=2, default=float))
    for level, d in summary["datasets"].items():
        counts = f"{d['transitions']} transitions, {d['episodes']} episodes, mean return {d['mean_episode_return']:.1f}"
        print(f"{level}: {d['dataset_id']} ({counts}) at {d['path']}")


if __name__ == "__main__":
    main()
