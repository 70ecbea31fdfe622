"""D4RL-style generation with TorchRL's SAC: a tiny run on Hopper-v5, round-tripped through the buffer."""

import dataclasses
import json
from importlib import metadata

import pytest
import torch

from torchrl_bdpo.checkpoint import load_checkpoint
from torchrl_bdpo.data import make_offline_buffer
from torchrl_bdpo.data.generate import DatasetGenerator, EpisodeSplitter, GenerateConfig, generate

pytestmark = pytest.mark.filterwarnings("ignore")

ALL = ("random", "medium", "medium-replay", "expert", "medium-expert")


def tiny(tmp_path, **kwargs):
    kw = dict(
        env_id="Hopper-v5",
        levels=ALL,
        num_transitions=200,
        out_dir=str(tmp_path / "out"),
        frames_per_batch=50,
        init_random_frames=100,
        eval_every=100,
        eval_episodes=1,
        max_medium_frames=1000,
        expert_frames=400,
        expert_return=1.0,
        random_return_episodes=3,
        hidden=32,
        batch_size=32,
        checkpoint_every=100,
        progress=False,
    )
    kw.update(kwargs)
    return GenerateConfig(**kw)


@pytest.fixture
def minari_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    return tmp_path / "minari"


def assert_same_transitions(buffer_td, ref):
    ref_action = ref["action"].clamp(-(1 - 1e-5), 1 - 1e-5)
    assert buffer_td.shape == ref.shape
    torch.testing.assert_close(buffer_td["observation"], ref["observation"], rtol=0, atol=0)
    torch.testing.assert_close(buffer_td["action"], ref_action, rtol=0, atol=0)
    for key in ("observation", "reward", "terminated", "truncated", "done"):
        torch.testing.assert_close(buffer_td["next", key], ref["next", key], rtol=0, atol=0)


def test_tiny_generation_round_trips_every_transition(tmp_path, minari_root):
    cfg = tiny(tmp_path)
    summary = generate(cfg)
    state = load_checkpoint(tmp_path / "out" / "checkpoint.pt")
    levels = state["levels"]
    assert set(summary["datasets"]) == set(ALL)
    for level in ALL:
        buffer = make_offline_buffer(cfg.dataset_id(level), batch_size=8, reward_mode="none", download=False)
        info = buffer.dataset_info
        assert_same_transitions(buffer.storage[: len(buffer)], levels[level])
        # the reference scores: the random policy's return, this run's expert's return
        assert info.ref_min_score == pytest.approx(state["random_return"])
        assert info.ref_max_score == pytest.approx(state["expert_policy"]["eval_return"])
        assert info.env_id == "Hopper-v5" and info.observation_dim == 11 and info.action_dim == 3
    n = cfg.num_transitions
    assert [summary["datasets"][lv]["transitions"] for lv in ALL] == [n, n, state["medium_policy"]["frames"], n, 2 * n]
    # medium-expert is the medium data followed by the expert data
    me, med, exp = levels["medium-expert"], levels["medium"], levels["expert"]
    torch.testing.assert_close(me["observation"], torch.cat([med["observation"], exp["observation"]]))
    # every episode ends done, only the cut ones truncated; each level's episodes are numbered in order
    for level in ALL:
        td = levels[level]
        last = torch.cat([td["episode"][1:] != td["episode"][:-1], torch.tensor([True])])
        assert bool(td["next", "done"].squeeze(-1)[last].all())
        assert not bool((td["next", "terminated"] & td["next", "truncated"]).any())
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["ref_max_source"].startswith("the deterministic evaluation return")
    assert written["software"]["mujoco"] == metadata.version("mujoco")  # a dataset's bits depend on it
    assert (tmp_path / "out" / "sac_learning_curve.png").stat().st_size > 0


class _Stop(Exception):
    pass


def test_resume_continues_from_the_checkpoint(tmp_path, minari_root, monkeypatch):
    cfg = tiny(tmp_path, levels=("medium-replay",), expert_return=3.0, max_medium_frames=400)
    calls = {"n": 0}

    def evaluate(self, env, actor):  # below the medium level twice, then interrupted
        calls["n"] += 1
        if calls["n"] == 3:  # at frame 300, after the checkpoint at frame 200
            raise _Stop()
        return 0.0 if calls["n"] < 3 else 5.0

    monkeypatch.setattr(DatasetGenerator, "_evaluate", evaluate)
    with pytest.raises(_Stop):
        generate(cfg)
    saved = load_checkpoint(tmp_path / "out" / "checkpoint.pt")
    assert saved["frames"] == 200 and len(saved["sac"]["buffer"]) == 200
    summary = generate(cfg)  # resumes: the next evaluation (frame 300) reaches the medium level
    assert summary["medium_policy"]["frames"] == 300 and summary["sac_frames"] == 300
    buffer = make_offline_buffer(cfg.dataset_id("medium-replay"), batch_size=8, reward_mode="none", download=False)
    data = buffer.storage[: len(buffer)]
    before = saved["sac"]["buffer"]
    # the transitions collected before the interruption are the dataset's first ones
    torch.testing.assert_close(data["observation"][:200], before["observation"])
    torch.testing.assert_close(data["next", "reward"][:200], before["next", "reward"])
    assert data.shape[0] == 300


def test_raising_the_medium_frame_cap_resumes(tmp_path, minari_root, monkeypatch):
    """The cap's error says how to go on, and going on does not start SAC over."""
    calls = {"n": 0}

    def evaluate(self, env, actor):  # below the medium level at frames 100 and 200, above it at 300
        calls["n"] += 1
        return 5.0 if calls["n"] >= 3 else 0.0

    monkeypatch.setattr(DatasetGenerator, "_evaluate", evaluate)
    cfg = tiny(tmp_path, levels=("medium",), expert_return=3.0, max_medium_frames=200, checkpoint_every=1000)
    with pytest.raises(
        RuntimeError,
        match=r"in 200 frames \(max_medium_frames=200; best evaluation 0\)\. Rerun with "
        r"a higher max_medium_frames to continue from the checkpoint at frame 200",
    ):
        generate(cfg)
    assert load_checkpoint(tmp_path / "out" / "checkpoint.pt")["frames"] == 200
    # a higher cap (and another checkpoint interval) resumes the same run
    summary = generate(dataclasses.replace(cfg, max_medium_frames=1000, checkpoint_every=150))
    assert summary["medium_policy"]["frames"] == 300 and calls["n"] == 3
    with pytest.raises(ValueError, match=r"other settings \(differing: \['hidden'\]\)"):
        generate(dataclasses.replace(cfg, hidden=64))


def test_expert_levels_added_to_a_finished_run_continue_its_sac(tmp_path, minari_root, monkeypatch):
    """A medium run can grow the expert levels later: SAC goes on from its checkpoint (same
    replay buffer) to expert_frames instead of starting over; other level changes refuse."""
    monkeypatch.setattr(DatasetGenerator, "_evaluate", lambda self, env, actor: 5.0)  # medium at frame 100
    cfg = tiny(tmp_path, levels=("random", "medium", "medium-replay"), expert_return=3.0, expert_frames=300)
    first = generate(cfg)
    assert first["sac_frames"] == 100 and first["ref_max_score"] == 3.0
    saved = load_checkpoint(tmp_path / "out" / "checkpoint.pt")
    medium_replay = saved["levels"]["medium-replay"].clone()
    with pytest.raises(ValueError, match=r"differing: \['levels'\]\).*may add the levels \['expert', 'medium-expert'\]"):
        generate(dataclasses.replace(cfg, levels=("medium", "medium-replay")))
    grown = dataclasses.replace(cfg, levels=ALL)
    seen = []
    real_checkpoint = DatasetGenerator._checkpoint

    def checkpoint(self, state, levels, loss, optim, rb, *args, **kwargs):
        if rb is not None:
            seen.append(rb.storage[: len(rb)].clone())
        return real_checkpoint(self, state, levels, loss, optim, rb, *args, **kwargs)

    monkeypatch.setattr(DatasetGenerator, "_checkpoint", checkpoint)
    summary = generate(grown)
    assert summary["sac_frames"] == 300 and summary["expert_policy"]["frames"] == 300
    assert summary["medium_policy"]["frames"] == 100  # kept, not found again
    assert summary["ref_max_score"] == 5.0  # the expert's return, in every dataset written again
    # the continued SAC trained on the first run's transitions: they open its replay buffer
    assert len(seen[-1]) == 200  # its checkpoint at frame 200 (the loop stops at 300 before the next)
    torch.testing.assert_close(seen[-1]["observation"][:100], saved["sac"]["buffer"]["observation"])
    torch.testing.assert_close(seen[-1]["action"][:100], saved["sac"]["buffer"]["action"])
    for level in ALL:
        buffer = make_offline_buffer(grown.dataset_id(level), batch_size=8, reward_mode="none", download=False)
        assert buffer.dataset_info.ref_max_score == 5.0, level
    data = make_offline_buffer(grown.dataset_id("medium-replay"), batch_size=8, reward_mode="none", download=False)
    data = data.storage[: len(data)]
    torch.testing.assert_close(data["observation"], medium_replay["observation"])  # medium-replay unchanged
    # another run (its own out_dir and ids) that grows into ids it did not write: refused before SAC
    other = dataclasses.replace(cfg, out_dir=str(tmp_path / "other"), overwrite=True)
    generate(other)
    with pytest.raises(FileExistsError, match=r"'generated/hopper/expert-v0' exists already"):
        generate(dataclasses.replace(other, levels=ALL, overwrite=False))
    assert load_checkpoint(tmp_path / "other" / "checkpoint.pt")["frames"] == 100  # no SAC ran


def test_bad_input(tmp_path, minari_root):
    with pytest.raises(ValueError, match=r"levels=\['meduim'\]: expected a non-empty subset"):
        generate(tiny(tmp_path, levels=("meduim",)))
    with pytest.raises(ValueError, match="no reference expert return is known for 'Pendulum'"):
        generate(tiny(tmp_path, env_id="Pendulum-v1", expert_return=None))
    with pytest.raises(RuntimeError, match="did not reach the medium level"):
        generate(tiny(tmp_path / "a", levels=("medium",), expert_return=1e9, max_medium_frames=200))
    cfg = tiny(tmp_path / "b", levels=("random",))
    generate(cfg)
    with pytest.raises(FileExistsError, match="exists already.*overwrite=true"):
        generate(dataclasses.replace(cfg, out_dir=str(tmp_path / "c")))
    with pytest.raises(ValueError, match=r"other settings \(differing: \['seed'\]\)"):
        generate(dataclasses.replace(cfg, seed=1))


def test_episode_splitter_cuts_at_done():
    from tensordict import TensorDict

    def batch(done):
        n = len(done)
        d = torch.tensor(done).unsqueeze(-1)
        return TensorDict({"x": torch.arange(n), "next": {"done": d}}, [n])

    sp = EpisodeSplitter()
    b, finished = sp.add(batch([False, True, False]))
    assert b["episode"].tolist() == [0, 0, 1] and [f["x"].tolist() for f in finished] == [[0, 1]]
    b, finished = sp.add(batch([False, True]))
    assert b["episode"].tolist() == [1, 1] and [f["x"].tolist() for f in finished] == [[2, 0, 1]]
    assert sp.close() is None


def test_weak_medium_is_a_rollout_of_the_same_sac_run(tmp_path, minari_root):
    """``weak-medium``: the first SAC policy past ``weak_band[0]`` x the expert return, rolled out;
    with ``medium`` in the same run, SAC trains once and each level is a rollout."""
    cfg = tiny(tmp_path, levels=("weak-medium", "medium", "medium-replay"), expert_return=1.0)
    summary = generate(cfg)
    state = load_checkpoint(tmp_path / "out" / "checkpoint.pt")
    assert set(summary["datasets"]) == {"weak-medium", "medium", "medium-replay"}
    weak, medium = state["weak_policy"], state["medium_policy"]
    assert weak["frames"] <= medium["frames"] and weak["eval_return"] >= 0.2 * cfg.reference_expert_return
    assert summary["weak_policy"]["frames"] == weak["frames"]
    buffer = make_offline_buffer(cfg.dataset_id("weak-medium"), batch_size=8, reward_mode="none", download=False)
    assert_same_transitions(buffer.storage[: len(buffer)], state["levels"]["weak-medium"])
    assert summary["datasets"]["weak-medium"]["transitions"] == cfg.num_transitions
    # the two rollouts are their own draws (other seeds), not copies
    assert not torch.equal(state["levels"]["weak-medium"]["observation"][:50], state["levels"]["medium"]["observation"][:50])
    # weak-medium alone: SAC stops at the weak policy
    only = tiny(tmp_path / "only", levels=("weak-medium",), expert_return=1.0, dataset_prefix="weakonly")
    out = generate(only)
    saved = load_checkpoint(tmp_path / "only" / "out" / "checkpoint.pt")
    assert "medium_policy" not in saved and saved["frames"] == saved["weak_policy"]["frames"]
    assert set(out["datasets"]) == {"weak-medium"}
    with pytest.raises(ValueError, match=r"weak_band=\(0.3, 0.2\): expected 0 < low <= high"):
        tiny(tmp_path, weak_band=(0.3, 0.2)).validate()


def test_every_bad_setting_is_named(tmp_path):
    with pytest.raises(ValueError) as err:
        tiny(tmp_path, num_transitions=0, checkpoint_every=0, batch_size=-1, lr=0.0, gamma=1.5, tau=0.0, hidden=2.5).validate()
    for line in (
        "num_transitions=0: expected an integer >= 1",
        "checkpoint_every=0: expected an integer >= 1",
        "batch_size=-1: expected an integer >= 1",
        "lr=0.0: expected a number > 0",
        "gamma=1.5: expected a number >= 0 and <= 1",
        "tau=0.0: expected a number > 0 and <= 1",
        "hidden=2.5: expected an integer >= 1",
    ):
        assert line in str(err.value), line
