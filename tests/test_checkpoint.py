"""Checkpoint files: weights_only loading, clear errors for crafted or broken files, durable writes."""

import random

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from torchrl_bdpo.checkpoint import from_plain, load_checkpoint, remove_stale_tmp, rng_states, save_checkpoint, set_rng_states, to_plain


class _Evil:
    """Unpickling this creates a file: what a crafted checkpoint could do with any callable."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_checkpoint_runs_nothing_and_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    torch.save({"loss": {}, "payload": _Evil(marker)}, path)
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint.pt holds objects other than tensors .*could run code"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", None])
def test_truncated_or_empty_checkpoints_name_the_file(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    if content is None:  # a real checkpoint cut in half
        save_checkpoint(path, {"x": torch.randn(1000)})
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"could not read checkpoint .*checkpoint.pt .*truncated, empty or not a checkpoint. Delete it"):
        load_checkpoint(path)


def test_round_trip_of_tensordicts_arrays_and_rng_states(tmp_path):
    td = TensorDict({"a": torch.randn(4, 3), "next": {"done": torch.tensor([[True], [False], [True], [False]])}}, [4])
    state = {
        "levels": {"medium": td},
        "evals": [(5000, np.float64(12.5)), (10000, 30.0)],
        "array": np.arange(6, dtype=np.uint32).reshape(2, 3),
        "nested": {"flag": True, "name": "x", "none": None},
    }
    path = tmp_path / "ck.pt"
    save_checkpoint(path, state)
    assert not (tmp_path / "ck.pt.tmp").exists()
    back = load_checkpoint(path)
    assert isinstance(back["levels"]["medium"], TensorDict) and back["levels"]["medium"].batch_size == (4,)
    assert (back["levels"]["medium"] == td).all()
    assert back["evals"] == [(5000, 12.5), (10000, 30.0)]
    assert back["array"].dtype == np.uint32 and (back["array"] == state["array"]).all()
    assert back["nested"] == state["nested"]
    assert from_plain(to_plain(state))["evals"] == back["evals"]


def test_rng_states_restore_every_generator(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    np.random.normal()  # a cached gaussian in numpy's state
    path = tmp_path / "rng.pt"
    save_checkpoint(path, {"rng": rng_states()})
    want = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.normal())
    set_rng_states(load_checkpoint(path)["rng"])
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.normal())
    torch.testing.assert_close(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[2] == want[2] and got[3] == want[3]


def test_stale_tmp_is_removed(tmp_path):
    path = tmp_path / "checkpoint.pt"
    assert not remove_stale_tmp(path)
    (tmp_path / "checkpoint.pt.tmp").write_bytes(b"half a write")
    assert remove_stale_tmp(path) and not (tmp_path / "checkpoint.pt.tmp").exists()


def test_save_fsyncs_before_the_rename(tmp_path, monkeypatch):
    import os

    order = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b))[1])
    save_checkpoint(tmp_path / "c.pt", {"x": torch.ones(2)})
    assert order[:2] == ["fsync", "replace"]
