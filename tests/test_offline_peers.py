"""benchmarks/offline_peers.py: TorchRL's IQL, CQL, TD3+BC and BC on our offline buffers."""

import json
from importlib import metadata

import numpy as np
import pytest
import torch

from tests.loaders import load_benchmark

pytestmark = pytest.mark.filterwarnings("ignore")

peers = load_benchmark("offline_peers")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A 300-transition random-policy Hopper-v5 dataset, made by the generator (its local path)."""
    import os

    from torchrl_bdpo.data.generate import GenerateConfig, generate

    root = tmp_path_factory.mktemp("minari")
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        generate(GenerateConfig(levels=("random",), num_transitions=300, out_dir=str(root / "gen"), random_return_episodes=3, progress=False))
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH")
        else:
            os.environ["MINARI_DATASETS_PATH"] = old
    return root / "generated" / "hopper" / "random-v0"


def test_every_peer_trains_and_is_evaluated_at_the_same_steps(tmp_path, dataset):
    import minari

    result = peers.main(
        [
            "--dataset",
            str(dataset),
            "--steps",
            "30",
            "--eval-every",
            "20",
            "--episodes",
            "2",
            "--max-steps",
            "15",
            "--batch-size",
            "32",
            "--hidden",
            "32",
            "--seeds",
            "0",
            "1",
            "--log-interval",
            "10",
            "--out-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert json.loads((tmp_path / "peers.json").read_text()) == result
    assert result["machine"]["torchrl"] == metadata.version("torchrl") and result["machine"]["mujoco"] == metadata.version("mujoco")
    assert (tmp_path / "peers.png").stat().st_size > 0
    assert set(result["runs"]) == set(peers.ALGOS)
    for runs in result["runs"].values():
        assert set(runs) == {"0", "1"}
        for run in runs.values():
            assert [e["step"] for e in run["evals"]] == [20, 30]  # every eval_every, and the last step
            for e in run["evals"]:
                assert len(e["returns"]) == 2 and e["mean"] == pytest.approx(np.mean(e["returns"]))
    # the dataset's own mean episode return, in the env's (unscaled) rewards
    episodes = list(minari.load_dataset(str(dataset)).iterate_episodes())
    assert result["dataset"]["mean_return"] == pytest.approx(np.mean([ep.rewards.sum() for ep in episodes]), rel=1e-5)
    # the losses reached torchrl's CSV logger
    assert (tmp_path / "logs" / "td3bc_seed0" / "scalars" / "loss_qvalue.csv").exists()
    assert (tmp_path / "logs" / "cql_seed1" / "scalars" / "loss_cql.csv").exists()


def test_bc_fits_the_data_actions():
    """BC regresses on the data's actions: where they are a function of the state, it learns it."""
    from tensordict import TensorDict

    torch.manual_seed(0)
    obs = torch.randn(512, 11)
    data = TensorDict({"observation": obs, "action": 0.9 * torch.tanh(obs @ torch.randn(11, 3) / 3)}, [512])
    bc = peers.make_peer("bc", 11, 3, steps=1, hidden=64)

    def error():
        with torch.no_grad():
            return (bc.policy(data.select("observation").clone())["action"] - data["action"]).pow(2).sum(-1).mean().item()

    before = error()
    for step in range(400):
        bc.update(data[torch.randint(0, 512, (64,))], step)
    assert error() < 0.05 * before


def test_cql_clones_the_behavior_first():
    """CQL's actor follows TorchRL's recipe: behavior cloning for the first 4% of the steps."""
    cql = peers.make_peer("cql", 11, 3, steps=1000, hidden=16)
    assert cql.bc_steps == 40


def test_bad_arguments_are_named(tmp_path, dataset):
    with pytest.raises(ValueError, match="--algos sac"):
        peers.main(["--dataset", str(dataset), "--algos", "sac", "--out-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--steps 0"):
        peers.main(["--dataset", str(dataset), "--steps", "0", "--out-dir", str(tmp_path)])
