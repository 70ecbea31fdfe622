"""Offline-to-online glue: collector data in the offline buffers' layout, and a mixed buffer.

Offline buffers (:func:`~torchrl_bdpo.data.make_offline_buffer`) hold float32 transitions with
``[n, 1]`` rewards scaled by ``dataset_info.reward_scale`` and bool flags; a torchrl
``Collector`` yields raw rewards and more keys (``collector``, ``step_count``, ...). Mixing the
two without care gives Q targets on two reward scales.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import ReplayBuffer
from torchrl.data.replay_buffers.offline_to_online import OfflineToOnlineReplayBuffer
from torchrl.data.replay_buffers.samplers import RandomSampler

TRANSITION_KEYS = ("observation", "action", ("next", "observation"), ("next", "reward"), ("next", "terminated"), ("next", "truncated"), ("next", "done"))


def to_offline_layout(data: TensorDictBase, reward_scale: float = 1.0) -> TensorDict:
    """Transitions of ``data`` (e.g. a collector batch, any batch shape) in the offline layout.

    Keeps :data:`TRANSITION_KEYS` (flattened to ``[n]``), multiplies the rewards by
    ``reward_scale`` (the offline data's ``dataset_info.reward_scale``), casts data to float32
    and flags to bool. A missing ``truncated`` is derived as ``done & ~terminated``; any other
    missing key raises a ``KeyError`` that names it.
    """
    flat = data.reshape(-1)
    present = set(flat.keys(True, True))
    missing = [k for k in TRANSITION_KEYS if k not in present and k != ("next", "truncated")]
    if missing:
        raise KeyError(
            f"to_offline_layout: the data has no {missing} entries (it holds: "
            f"{', '.join(sorted(str(k) for k in present))}). Collect from an env that reports "
            f"'terminated' and 'done' (torchrl's GymEnv does)."
        )
    n = flat.shape[0]
    terminated = flat.get(("next", "terminated")).reshape(n, 1).bool()
    done = flat.get(("next", "done")).reshape(n, 1).bool()
    truncated = flat.get(("next", "truncated"), None)
    truncated = (done & ~terminated) if truncated is None else truncated.reshape(n, 1).bool()
    return TensorDict(
        {
            "observation": flat.get("observation").float(),
            "action": flat.get("action").float(),
            "next": {
                "observation": flat.get(("next", "observation")).float(),
                "reward": flat.get(("next", "reward")).reshape(n, 1).float() * reward_scale,
                "terminated": terminated,
                "truncated": truncated,
                "done": done,
            },
        },
        batch_size=[n],
        device=flat.device,
    )


def check_offline_fraction(value, name: str = "offline_fraction") -> None:
    """A ``ValueError`` naming ``name`` unless ``value`` is a number in (0, 1]."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ValueError(
            f"{name}={value!r}: expected a number in (0, 1], the share of each batch from the offline data "
            f"(1: the offline data only, continued offline training; the collected frames are stored, not trained on)."
        )


class OfflineToOnlineBuffer(OfflineToOnlineReplayBuffer):
    """torchrl's ``OfflineToOnlineReplayBuffer`` over one of our offline buffers.

    Each :meth:`sample` draws exactly ``round(offline_fraction * batch_size)`` transitions from
    the offline data (RLPD-style 50/50 by default; ``anneal`` lowers it) and the rest from the
    online data. ``offline_fraction=1.0`` (which torchrl's class refuses) samples the offline
    data only while the online data is still stored: continued offline training, the baseline
    an offline-to-online run is measured against. :meth:`extend` takes collector batches as
    they come and stores them through :func:`to_offline_layout`, with the offline data's reward
    scale, so that both halves share keys and units. The offline buffer is read, never changed.

    Examples:
        >>> # buffer = make_offline_buffer("generated/hopper/medium-v0", 256)
        >>> # rb = OfflineToOnlineBuffer(buffer, online_capacity=100_000)
        >>> # for batch in collector: rb.extend(batch); loss(rb.sample())
    """

    def __init__(self, offline_buffer, *, online_capacity: int, offline_fraction: float = 0.5, batch_size: int | None = None):
        info = getattr(offline_buffer, "dataset_info", None)
        if info is None:
            raise ValueError(
                "offline_buffer has no dataset_info: pass a buffer from make_offline_buffer (its reward scale is what the online rewards are multiplied by)."
            )
        self.reward_scale = float(info.reward_scale)
        # a view that reads the offline storage and keeps the transition keys (no 'episode',
        # and no 'index', which a TensorDictReplayBuffer adds and the online half lacks)
        view = ReplayBuffer(
            storage=offline_buffer.storage, sampler=RandomSampler(), batch_size=offline_buffer.batch_size, transform=lambda td: td.select(*TRANSITION_KEYS)
        )
        view.dataset_info = info
        check_offline_fraction(offline_fraction)
        super().__init__(
            view,
            online_capacity=online_capacity,
            offline_fraction=offline_fraction if offline_fraction < 1 else 0.5,  # torchrl accepts (0, 1)
            batch_size=batch_size if batch_size is not None else offline_buffer.batch_size,
        )
        if offline_fraction == 1:  # torchrl's sample draws the offline data alone once its share fills the batch
            self._offline_fraction = self._base_offline_fraction = 1.0

    def extend(self, data) -> torch.Tensor:
        return super().extend(to_offline_layout(data, self.reward_scale))
