"""Offline buffers keep every transition: checked against minari's own episodes."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensordict import TensorDict

from torchrl_bdpo.data import DatasetInfo, check_env_compatibility, episode_returns, make_offline_buffer, transitions_from_episodes

pytestmark = pytest.mark.filterwarnings("ignore")


def make_episodes(num=4, obs_dim=3, act_dim=1, seed=0, nan_at=None):
    from minari.data_collector import EpisodeBuffer

    rng = np.random.default_rng(seed)
    episodes = []
    for i in range(num):
        T = 5 + 3 * i
        obs = rng.normal(size=(T + 1, obs_dim)).astype(np.float32)
        if nan_at is not None and nan_at[0] == i:
            obs[nan_at[1], 0] = np.nan
        episodes.append(
            EpisodeBuffer(
                id=i,
                observations=obs,
                actions=rng.uniform(-1, 1, size=(T, act_dim)).astype(np.float32),
                rewards=rng.normal(size=T).astype(np.float64).tolist(),
                terminations=[False] * (T - 1) + [i % 2 == 0],
                truncations=[False] * (T - 1) + [i % 2 == 1],
            )
        )
    return episodes


@pytest.fixture
def minari_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    return tmp_path / "minari"


def _dataset(dataset_id, episodes, action_space, obs_dim=3, **kwargs):
    import minari

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,))
        return minari.create_dataset_from_buffers(
            dataset_id, episodes, env="Pendulum-v1", action_space=action_space, observation_space=observation_space, algorithm_name="random", **kwargs
        )


def create(dataset_id, episodes, **kwargs):
    return _dataset(dataset_id, episodes, gym.spaces.Box(-1, 1, (1,)), ref_min_score=-5.0, ref_max_score=10.0, **kwargs)


def test_round_trip_every_transition(minari_root):
    import minari

    create("test/pendulum/random-v0", make_episodes())
    path = minari_root / "test" / "pendulum" / "random-v0"
    buffer = make_offline_buffer(str(path), batch_size=16, reward_mode="none", action_clip=None)
    info = buffer.dataset_info
    reference = minari.MinariDataset(str(path / "data"))
    episodes = list(reference.iterate_episodes())
    total = sum(len(ep.actions) for ep in episodes)
    data = buffer[:]
    assert len(buffer) == total == info.num_transitions == reference.total_steps
    assert info.num_episodes == len(episodes) == 4
    expected_obs = np.concatenate([ep.observations[:-1] for ep in episodes])
    expected_next = np.concatenate([ep.observations[1:] for ep in episodes])
    expected_act = np.concatenate([ep.actions for ep in episodes])
    expected_rew = np.concatenate([ep.rewards for ep in episodes])
    expected_term = np.concatenate([ep.terminations for ep in episodes])
    expected_trunc = np.concatenate([ep.truncations for ep in episodes])
    # storage order is the dataset order: compare every transition, not only sums
    np.testing.assert_array_equal(data["observation"].numpy(), expected_obs)
    np.testing.assert_array_equal(data["next", "observation"].numpy(), expected_next)
    np.testing.assert_array_equal(data["action"].numpy(), expected_act)
    np.testing.assert_allclose(data["next", "reward"].squeeze(-1).numpy(), expected_rew, rtol=1e-6)
    np.testing.assert_array_equal(data["next", "terminated"].squeeze(-1).numpy(), expected_term)
    np.testing.assert_array_equal(data["next", "truncated"].squeeze(-1).numpy(), expected_trunc)
    assert data["next", "terminated"].sum() == 2 and data["next", "truncated"].sum() == 2
    assert float(data["observation"].sum()) == pytest.approx(float(expected_obs.sum()), rel=1e-5)
    assert data["observation"].dtype == torch.float32 and data["action"].dtype == torch.float32
    assert (info.ref_min_score, info.ref_max_score) == (-5.0, 10.0)
    assert info.env_id == "Pendulum-v1"
    assert info.normalized_score(10.0) == pytest.approx(100.0)
    assert info.normalized_score(2.5) == pytest.approx(50.0)
    batch = buffer.sample()
    assert batch.batch_size == (16,)
    # by id, from the local store
    by_id = make_offline_buffer("test/pendulum/random-v0", 8, reward_mode="none", action_clip=None, download=False)
    torch.testing.assert_close(by_id[:]["observation"], data["observation"])


def test_action_clip_and_reward_scaling():
    class Ep:
        def __init__(self, rewards, actions):
            T = len(rewards)
            self.observations = np.zeros((T + 1, 2), dtype=np.float32)
            self.actions = np.asarray(actions, dtype=np.float32).reshape(T, 1)
            self.rewards = np.asarray(rewards)
            self.terminations = [False] * (T - 1) + [True]
            self.truncations = [False] * T

    # two episodes returning 10 and 30: locomotion scale 1000 / 20 = 50
    td = transitions_from_episodes([Ep([4.0, 6.0], [1.0, -1.0]), Ep([10.0, 10.0, 10.0], [0.5, 0.2, -0.3])])
    torch.testing.assert_close(episode_returns(td), torch.tensor([10.0, 30.0], dtype=torch.float64))
    from torchrl_bdpo.data.offline import reward_scale_for

    assert reward_scale_for(td, "locomotion") == pytest.approx(50.0)
    assert reward_scale_for(td, "antmaze") == 100.0
    assert reward_scale_for(td, "none") == 1.0
    with pytest.raises(ValueError, match="reward_mode='bogus'"):
        reward_scale_for(td, "bogus")
    flat = transitions_from_episodes([Ep([1.0], [0.0]), Ep([1.0], [0.0])])
    with pytest.raises(ValueError, match="every one of the 2 episodes returns 1"):
        reward_scale_for(flat, "locomotion")


def test_reward_scale_warns_on_a_narrow_spread_or_one_dominant_episode():
    import warnings

    from torchrl_bdpo.data.offline import reward_scale_for

    class Ep:
        def __init__(self, ret):
            self.observations = np.zeros((2, 2), dtype=np.float32)
            self.actions = np.zeros((1, 1), dtype=np.float32)
            self.rewards = np.asarray([ret])
            self.terminations, self.truncations = [True], [False]

    # returns 1000, 1001, 1002: spread 2 is 0.2% of their size; scale 500
    narrow = transitions_from_episodes([Ep(1000.0), Ep(1001.0), Ep(1002.0)])
    with pytest.warns(UserWarning, match=r"spread over only 2 \(min 1000, max 1002; 0.20% .*scale 1000 / spread = 500"):
        assert reward_scale_for(narrow, "locomotion") == pytest.approx(500.0)
    # one finite outlier reward (3e38) sets the spread: the warning names episode 2 and its return
    outlier = transitions_from_episodes([Ep(10.0), Ep(30.0), Ep(3e38), Ep(20.0)])
    with pytest.warns(UserWarning, match=r"episode 2 \(return 3e\+38\) alone sets the spread"):
        reward_scale_for(outlier, "locomotion")
    low = transitions_from_episodes([Ep(10.0), Ep(30.0), Ep(-5000.0), Ep(20.0)])
    with pytest.warns(UserWarning, match=r"episode 2 \(return -5000\) alone sets the spread 5030, 252x the other 3"):
        reward_scale_for(low, "locomotion")
    # a spread shared by many episodes: no warning
    spread = transitions_from_episodes([Ep(float(r)) for r in (10, 30, 500, 900, 1000)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reward_scale_for(spread, "locomotion") == pytest.approx(1000 / 990)


def test_buffer_scales_and_clips(minari_root):
    create("test/pendulum/scaled-v0", make_episodes())
    path = minari_root / "test" / "pendulum" / "scaled-v0"
    raw = make_offline_buffer(str(path), 4, reward_mode="none", action_clip=None)[:]
    buf = make_offline_buffer(str(path), 4, reward_mode="locomotion")
    returns = episode_returns(raw)
    scale = 1000.0 / float(returns.max() - returns.min())
    assert buf.dataset_info.reward_scale == pytest.approx(scale)
    torch.testing.assert_close(buf[:]["next", "reward"], raw["next", "reward"] * scale)
    assert buf[:]["action"].abs().max() <= 1 - 1e-5
    torch.testing.assert_close(buf[:]["action"], raw["action"].clamp(-(1 - 1e-5), 1 - 1e-5))


def test_nan_rows_are_reported(minari_root):
    create("test/pendulum/nan-v0", make_episodes(nan_at=(2, 3)))
    path = minari_root / "test" / "pendulum" / "nan-v0"
    # observation 3 of episode 2 is both the next observation of step 2 and the observation of step 3
    with pytest.raises(ValueError, match=r"2 of \d+ transitions hold NaN.*episodes \[2\]"):
        make_offline_buffer(str(path), 4)


def test_unknown_id_offline(minari_root):
    with pytest.raises(FileNotFoundError, match=r"not found locally.*minari download mujoco/nothing/here-v0.*generate"):
        make_offline_buffer("mujoco/nothing/here-v0", 4, download=False)
    with pytest.raises(FileNotFoundError, match="neither an existing path, a D4RL id"):
        make_offline_buffer("nothing-here", 4)


def test_missing_and_corrupted_files(tmp_path, minari_root):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="main_data.hdf5 does not exist"):
        make_offline_buffer(str(empty), 4)
    create("test/pendulum/broken-v0", make_episodes())
    path = minari_root / "test" / "pendulum" / "broken-v0"
    (path / "data" / "main_data.hdf5").write_bytes(b"this is not an hdf5 file")
    with pytest.raises(ValueError, match="corrupted or incomplete"):
        make_offline_buffer(str(path), 4)


def test_env_dimension_check():
    info = DatasetInfo("x", "minari-local", 10, 1, observation_dim=3, action_dim=2, reward_mode="none", reward_scale=1.0, env_id="Pendulum-v1")
    env = gym.make("Pendulum-v1")
    with pytest.raises(ValueError, match="action dim 2 in the dataset vs 1 in the environment"):
        check_env_compatibility(info, env)
    ok = DatasetInfo("x", "minari-local", 10, 1, observation_dim=3, action_dim=1, reward_mode="none", reward_scale=1.0)
    check_env_compatibility(ok, env)
    from torchrl.envs import GymEnv

    with pytest.raises(ValueError, match="action dim 2"):
        check_env_compatibility(info, GymEnv("Pendulum-v1"))


def test_d4rl_path_converts_torchrl_layout(monkeypatch):
    """The D4RL branch (download needs a network): torchrl's layout becomes ours, with D4RL's scores."""
    from tensordict import TensorDict

    import torchrl.data.datasets as datasets

    n = 6
    fake = TensorDict(
        {
            "observation": torch.randn(n, 11, dtype=torch.float64),
            "action": torch.full((n, 3), 1.0, dtype=torch.float64),
            "next": {
                "observation": torch.randn(n, 11, dtype=torch.float64),
                "reward": torch.tensor([1.0, 2.0, 3.0, 1.0, 1.0, 1.0]),
                "terminated": torch.tensor([False, False, True, False, False, False]),
                "truncated": torch.tensor([False, False, False, False, False, True]),
                "done": torch.tensor([False, False, True, False, False, True]),
            },
        },
        [n],
    )

    class FakeD4RL:
        def __init__(self, dataset_id, batch_size, direct_download, **kwargs):
            assert direct_download and dataset_id == "hopper-medium-v2"

        def __getitem__(self, idx):
            return fake

    monkeypatch.setattr(datasets, "D4RLExperienceReplay", FakeD4RL)
    buf = make_offline_buffer("hopper-medium-v2", 2)
    data, info = buf[:], buf.dataset_info
    assert info.source == "d4rl" and (info.ref_min_score, info.ref_max_score) == (-20.272305, 3234.3)
    assert data["observation"].dtype == torch.float32
    assert data["action"].max() == pytest.approx(1 - 1e-5)
    # episodes [1,2,3] and [1,1,1]: returns 6 and 3, scale 1000/3
    torch.testing.assert_close(data["next", "reward"].squeeze(-1), fake["next", "reward"].float() * 1000 / 3)
    assert data["next", "terminated"].sum() == 1 and data["next", "truncated"].sum() == 1


def test_d4rl_time_limit_transitions_without_their_next_observation_are_dropped(monkeypatch):
    """torchrl fills D4RL's missing next observations from the next row: at a time limit that is
    the next episode's first observation. Such rows go (counted, warned), as d4rl.qlearning_dataset
    drops them; a truncated row with its own next observation stays; the episodes stay the file's."""
    import torchrl.data.datasets as datasets

    # the file's rows: episode A (3 steps, cut by the time limit), episode B (2 steps, terminated),
    # episode C (2 steps, the last one truncated: no following row to compare with)
    obs = torch.arange(7 * 11, dtype=torch.float64).reshape(7, 11)
    next_obs = torch.cat([obs[1:], obs[-1:] + 0.5])  # torchrl's layout: the following row's observation
    truncated = torch.tensor([False, False, True, False, False, False, True])
    terminated = torch.tensor([False, False, False, False, True, False, False])
    fake = TensorDict(
        {
            "observation": obs,
            "action": torch.zeros(7, 3, dtype=torch.float64),
            "next": {
                "observation": next_obs,
                "reward": torch.tensor([1.0, 2.0, 4.0, 1.0, 1.0, 3.0, 3.0]),
                "terminated": terminated,
                "truncated": truncated,
                "done": terminated | truncated,
            },
        },
        [7],
    )

    class FakeD4RL:
        def __init__(self, dataset_id, batch_size, direct_download, **kwargs):
            pass

        def __getitem__(self, idx):
            return fake

    monkeypatch.setattr(datasets, "D4RLExperienceReplay", FakeD4RL)
    with pytest.warns(UserWarning, match=r"hopper-medium-v2: dropped 1 of 7 transitions, the time-limit ones"):
        buf = make_offline_buffer("hopper-medium-v2", 2)
    data, info = buf[:], buf.dataset_info
    assert info.dropped_transitions == 1 and info.num_transitions == len(data) == 6
    # every kept row, in order: the file's rows 0, 1, 3, 4, 5, 6
    kept = [0, 1, 3, 4, 5, 6]
    torch.testing.assert_close(data["observation"], obs[kept].float())
    torch.testing.assert_close(data["next", "observation"], next_obs[kept].float())
    assert data["next", "truncated"].reshape(-1).tolist() == truncated[kept].tolist()
    assert data["next", "terminated"].reshape(-1).tolist() == terminated[kept].tolist()
    # three episodes, returns 3 (A without its dropped step), 2 and 6: reward scale 1000 / (6 - 2)
    assert info.num_episodes == 3 and data["episode"].reshape(-1).tolist() == [0, 0, 1, 1, 2, 2]
    assert info.reward_scale == pytest.approx(1000 / 4)
    # a file with its own next observations (none equal to the following row's): nothing goes
    fake.set(("next", "observation"), next_obs + 0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        buf = make_offline_buffer("hopper-medium-v2", 2)
    assert buf.dataset_info.dropped_transitions == 0 and len(buf) == 7


def test_a_sampler_without_replacement_goes_through_every_transition_once_per_epoch(minari_root):
    from torchrl.data.replay_buffers.samplers import RandomSampler, SamplerWithoutReplacement

    create("test/pendulum/epochs-v0", make_episodes(num=2))  # 5 + 8 = 13 transitions
    path = str(minari_root / "test" / "pendulum" / "epochs-v0")
    assert isinstance(make_offline_buffer(path, 4)._sampler, RandomSampler)
    buf = make_offline_buffer(path, 13, sampler=SamplerWithoutReplacement())
    for _ in range(2):  # two epochs, each every transition once
        seen = buf.sample()["observation"]
        assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, buf[:]["observation"].tolist()))


def test_discounted_returns_by_hand_and_across_blocks():
    from torchrl_bdpo.data import discounted_returns

    # two episodes [1, 2] and [3, 4, 5], gamma 0.5
    td = TensorDict(
        {("next", "reward"): torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]]), ("next", "done"): torch.tensor([[False], [True], [False], [False], [True]])},
        [5],
    )
    expected = torch.tensor([2.0, 2.0, 3 + 0.5 * 4 + 0.25 * 5, 4 + 0.5 * 5, 5.0], dtype=torch.float64)
    torch.testing.assert_close(discounted_returns(td, 0.5), expected)
    torch.testing.assert_close(discounted_returns(td, 0.0), td["next", "reward"].reshape(-1).double())
    # an episode of 15k steps crosses the 4096-step blocks; episode ids instead of done flags
    g = torch.Generator().manual_seed(0)
    n = 20_000
    reward = torch.rand(n, 1, generator=g)
    episode = torch.zeros(n, dtype=torch.long)
    episode[1000:] = 1
    episode[16_000:] = 2
    long_td = TensorDict({("next", "reward"): reward, ("next", "done"): torch.zeros(n, 1, dtype=torch.bool), "episode": episode}, [n])
    ref, carry = torch.empty(n, dtype=torch.float64), 0.0
    for i in range(n - 1, -1, -1):
        if i + 1 < n and episode[i + 1] != episode[i]:
            carry = 0.0
        carry = float(reward[i]) + 0.99 * carry
        ref[i] = carry
    torch.testing.assert_close(discounted_returns(long_td, 0.99), ref, rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError, match="gamma=1.5"):
        discounted_returns(td, 1.5)


def test_episode_helpers_share_one_rule_for_interleaved_episode_ids():
    # two environments' episodes stored interleaved (ids 7, 3, 7, 3, 7): episode 7 is rows 0, 2, 4
    from torchrl_bdpo.data import discounted_returns, episode_index

    td = TensorDict(
        {
            ("next", "reward"): torch.tensor([[1.0], [10.0], [2.0], [20.0], [4.0]]),
            ("next", "done"): torch.zeros(5, 1, dtype=torch.bool),
            "episode": torch.tensor([7, 3, 7, 3, 7]),
        },
        [5],
    )
    assert episode_index(td).tolist() == [1, 0, 1, 0, 1]
    torch.testing.assert_close(episode_returns(td), torch.tensor([30.0, 7.0], dtype=torch.float64))
    expected = torch.tensor([1 + 0.5 * 2 + 0.25 * 4, 10 + 0.5 * 20, 2 + 0.5 * 4, 20.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(discounted_returns(td, 0.5), expected)
    # without ids, done flags delimit contiguous episodes
    td_done = TensorDict({("next", "reward"): torch.ones(4, 1), ("next", "done"): torch.tensor([[False], [True], [False], [True]])}, [4])
    assert episode_index(td_done).tolist() == [0, 0, 1, 1]


def test_exact_return_mask_keeps_terminated_episodes_and_steps_beyond_the_horizon():
    """gamma 0.5, tol 0.01: horizon ceil(log 0.01 / log 0.5) = 7 steps. A terminated episode
    counts whole; a cut one (time limit, or the data's end) only where more than 7 steps remain;
    interleaved episode ids follow one rule."""
    from torchrl_bdpo.data import exact_return_mask

    # episode 4 (ids 4): 10 steps, cut; episode 9: 3 steps, terminated; stored interleaved at the start
    ids = torch.tensor([4, 9, 4, 9, 4, 9] + [4] * 7)
    term = torch.zeros(13, 1, dtype=torch.bool)
    term[5] = True  # episode 9's last step
    td = TensorDict({("next", "reward"): torch.ones(13, 1), ("next", "terminated"): term, ("next", "done"): term.clone(), "episode": ids}, [13])
    mask = exact_return_mask(td, 0.5)
    # episode 4's steps, in order, sit at rows 0, 2, 4, 6..12: the first 3 of its 10 have more than 7 left
    expected = torch.zeros(13, dtype=torch.bool)
    expected[[0, 2, 4]] = True
    expected[[1, 3, 5]] = True
    assert mask.tolist() == expected.tolist()
    # without a terminated entry every episode counts as cut; at gamma 0.999 (horizon 4603) no step of a 1000-step cut episode counts
    no_term = td.exclude(("next", "terminated"))
    assert exact_return_mask(no_term, 0.5).tolist() == [True, False, True, False, True, False] + [False] * 7
    long_cut = TensorDict(
        {
            ("next", "reward"): torch.ones(1000, 1),
            ("next", "terminated"): torch.zeros(1000, 1, dtype=torch.bool),
            "episode": torch.zeros(1000, dtype=torch.long),
        },
        [1000],
    )
    assert not exact_return_mask(long_cut, 0.999).any() and exact_return_mask(long_cut, 0.99).sum() == 1000 - 459
    assert exact_return_mask(long_cut, 0.0).all() and not exact_return_mask(long_cut, 1.0).any()
    with pytest.raises(ValueError, match="tol=0"):
        exact_return_mask(td, 0.5, tol=0)


def _create_box(dataset_id, episodes, low, high, obs_dim=3):
    return _dataset(dataset_id, episodes, gym.spaces.Box(low, high, (episodes[0].actions.shape[-1],)), obs_dim)


def test_a_non_unit_action_box_is_rescaled_and_acted_back(minari_root):
    """Actions in a ±3 box (68% of them beyond ±1) are mapped to [-1, 1], never clipped; the
    buffer's ActionScaling maps the policy's actions back to the box."""
    episodes = make_episodes()
    for ep in episodes:
        ep.actions[:] = ep.actions * 3  # uniform on [-3, 3]
    _create_box("test/pendulum/wide-v0", episodes, -3.0, 3.0)
    path = minari_root / "test" / "pendulum" / "wide-v0"
    with pytest.warns(UserWarning, match=r"action space is \[-3, 3\], not \[-1, 1\]: actions were rescaled"):
        buffer = make_offline_buffer(str(path), 4, reward_mode="none")
    raw = np.concatenate([ep.actions for ep in episodes])
    torch.testing.assert_close(buffer[:]["action"], torch.from_numpy(raw / 3).clamp(-(1 - 1e-5), 1 - 1e-5))
    info = buffer.dataset_info
    assert info.action_low == [-3.0] and info.action_high == [3.0]
    scaling = info.action_scaling()
    assert float(scaling.loc) == 0.0 and float(scaling.scale) == 3.0
    # the env side: a policy action of 0.5 reaches Pendulum (box ±2 there) as 1.5
    from torchrl.envs import GymEnv, TransformedEnv

    env = TransformedEnv(GymEnv("Pendulum-v1"), info.action_scaling())
    td = env.reset()
    td["action"] = torch.tensor([0.5])
    assert float(env.transform.inv(td.clone())["action"]) == pytest.approx(1.5)
    env.close()


def test_actions_beyond_their_declared_box_are_refused_not_clipped(minari_root):
    episodes = make_episodes()
    for ep in episodes:
        ep.actions[:] = ep.actions * 3  # ±3 data declared as a [-1, 1] box
    _create_box("test/pendulum/lying-v0", episodes, -1.0, 1.0)
    path = minari_root / "test" / "pendulum" / "lying-v0"
    with pytest.raises(ValueError, match=r"action entries \(\d+\.\d%\) lie outside its declared action space, up to \|a\| = 2\.\d+"):
        make_offline_buffer(str(path), 4, reward_mode="none")
    kept = make_offline_buffer(str(path), 4, reward_mode="none", action_clip=None)  # kept as they are, on request
    assert float(kept[:]["action"].abs().max()) > 2


def test_dims_are_checked_against_the_metadata_and_missing_paths_are_named(minari_root, tmp_path):
    _create_box("test/pendulum/dims-v0", make_episodes(obs_dim=3), -1.0, 1.0, obs_dim=4)
    with pytest.raises(ValueError, match=r"its observations have 3 dims but its metadata declares observation_space .*\(4 dims\)"):
        make_offline_buffer(str(minari_root / "test" / "pendulum" / "dims-v0"), 4, reward_mode="none")
    with pytest.raises(FileNotFoundError, match=r"dataset path '.*nowhere' does not exist \(a path, not a Minari id"):
        make_offline_buffer(str(tmp_path / "nowhere"), 4)


def test_episode_stats_are_mean_length_and_discounted_return():
    """Two kept episodes, rewards [1, 1, 1] and [2]: lengths 3 and 1, discounted returns
    1 + g + g^2 and 2 (g = 0.5: 1.75 and 2)."""
    from tensordict import TensorDict

    from torchrl_bdpo.envs import episode_stats

    def episode(rewards):
        r = torch.tensor(rewards).unsqueeze(-1)
        return TensorDict({("next", "reward"): r}, [len(rewards)])

    stats = episode_stats([episode([1.0, 1.0, 1.0]), episode([2.0])], gamma=0.5)
    assert stats == {"length": 2.0, "discounted_return": (1.75 + 2.0) / 2}
    with pytest.raises(ValueError, match="episodes is empty"):
        episode_stats([], 0.99)
