"""The README's API example runs as written (on a tiny generated dataset, with fewer steps)."""

import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore")


def test_readme_api_example_runs(tmp_path, monkeypatch):
    from tensordict import TensorDict
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    from torchrl_bdpo.data.generate import GenerateConfig, generate

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    generate(GenerateConfig(levels=("random",), num_transitions=600, out_dir=str(tmp_path / "gen"), random_return_episodes=2, progress=False))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## API\n\n```python\n(.*?)```", readme, re.S).group(1)
    for old, new in (
        ("generated/hopper/medium-v0", "generated/hopper/random-v0"),
        ("range(2_000)", "range(3)"),
        ("range(10_000)", "range(12)"),
        ("step >= 1_000", "step >= 2"),
        ("EpsilonNetwork(A, S)", "EpsilonNetwork(A, S, hidden=16)"),
    ):
        assert old in block, old
        block = block.replace(old, new)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert torch.isfinite(scope["metrics"]["loss_qvalue"]) and torch.isfinite(scope["metrics"]["loss_value"])
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        action = scope["policy"](TensorDict({"observation": torch.randn(2, 11)}, [2]))["action"]
    assert action.shape == (2, 3) and action.abs().max() <= 1
