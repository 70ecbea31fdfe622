import re

import pytest
import torch
from tensordict import TensorDict, TensorDictParams
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_bdpo.diffusion import DiffusionActor, EpsilonNetwork, make_qvalue_operator, make_schedule, make_value_operator
from torchrl_bdpo.objectives import BDPOLoss, PathwiseKLLoss, TargetSoftUpdate
from torchrl_bdpo.ensemble import aggregate_ensemble
from torchrl_bdpo.speed import SpeedOptions
from torchrl_bdpo.speed.chunks import chunk_sizes

OBS, ACT, K, M, N = 3, 2, 3, 4, 5

pytestmark = pytest.mark.filterwarnings("ignore:No target network updater")


def make_loss(seed=0, qvalue_network=None, **kwargs):
    """The value network looks its time branch up (``num_steps=N``), as the scripts build it;
    ``qvalue_network`` replaces the Q ensemble (e.g. a known reward)."""
    torch.manual_seed(seed)
    actor = DiffusionActor(EpsilonNetwork(ACT, OBS, hidden=32, depth=2), make_schedule("vp", N))
    behavior = DiffusionActor(EpsilonNetwork(ACT, OBS, hidden=32, depth=2), make_schedule("vp", N))
    kw = dict(eta=0.2, rho=1.0, num_qvalue_nets=K, num_samples=M)
    kw.update(kwargs)
    value = make_value_operator(OBS, ACT, hidden=32, num_steps=N)
    if qvalue_network is None:
        qvalue_network = make_qvalue_operator(OBS, ACT, hidden=32)
    return BDPOLoss(actor, behavior, value, qvalue_network, **kw)


def make_batch(B=8, terminated=None, truncated=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    term = torch.zeros(B, 1, dtype=torch.bool) if terminated is None else terminated
    trunc = torch.zeros(B, 1, dtype=torch.bool) if truncated is None else truncated
    return TensorDict(
        {
            "observation": torch.randn(B, OBS, generator=g),
            "action": torch.rand(B, ACT, generator=g) * 2 - 1,
            "next": {
                "observation": torch.randn(B, OBS, generator=g),
                "reward": torch.randn(B, 1, generator=g),
                "terminated": term,
                "truncated": trunc,
                "done": term | trunc,
            },
        },
        [B],
    )


def grads_by_network(loss):
    out = {}
    for name, p in loss.named_parameters():
        net = name.split(".")[0]
        out[net] = out.get(net, False) or (p.grad is not None and bool(p.grad.abs().sum() > 0))
    return out


@pytest.mark.parametrize(
    "method, owner",
    [
        ("qvalue_loss", "qvalue_network_params"),
        ("value_loss", "value_network_params"),
        ("actor_loss", "actor_network_params"),
        ("behavior_loss", "behavior_network_params"),
    ],
)
def test_each_loss_trains_only_its_network(method, owner):
    loss = make_loss()
    value, _ = getattr(loss, method)(make_batch())
    value.backward()
    grads = grads_by_network(loss)
    assert grads[owner], f"{method} sent no gradient to {owner}"
    assert [n for n, g in grads.items() if g and n != owner] == []
    for name, buf in loss.named_buffers():
        if name.startswith("target_"):
            assert not buf.requires_grad and buf.grad is None


def test_keys_and_set_keys():
    loss = make_loss()
    out = loss(make_batch())
    assert set(loss.out_keys) == set(out.keys())
    assert out["kl_per_step"].shape == (N,)
    assert ("next", "terminated") in loss.in_keys
    loss.set_keys(observation="obs", terminated="term", reward="rew")
    data = make_batch()
    data.rename_key_("observation", "obs")
    data.rename_key_(("next", "observation"), ("next", "obs"))
    data.rename_key_(("next", "terminated"), ("next", "term"))
    data.rename_key_(("next", "reward"), ("next", "rew"))
    # the critics read "observation": the loss says which keys to rename
    with pytest.raises(KeyError, match="in_keys"):
        loss(data)
    loss2 = make_loss()
    loss2.set_keys(terminated="term", reward="rew")
    data2 = make_batch()
    data2.rename_key_(("next", "terminated"), ("next", "term"))
    data2.rename_key_(("next", "reward"), ("next", "rew"))
    assert torch.isfinite(loss2(data2)["loss_qvalue"])


def test_reductions_and_state_dict():
    loss = make_loss()
    data = make_batch()
    results = {}
    for reduction in ("none", "mean", "sum"):
        loss.reduction = reduction
        torch.manual_seed(5)
        results[reduction] = loss(data)
    for key in ("loss_qvalue", "loss_value", "loss_actor", "loss_behavior"):
        assert results["none"][key].shape == (8,)
        torch.testing.assert_close(results["none"][key].mean(), results["mean"][key])
        torch.testing.assert_close(results["none"][key].sum(), results["sum"][key])
    other = make_loss(seed=3)
    other.load_state_dict(loss.state_dict())
    for key, val in loss.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], val)
    torch.manual_seed(5)
    loss.reduction = other.reduction = "mean"
    a = loss(data)
    torch.manual_seed(5)
    b = other(data)
    for key in ("loss_qvalue", "loss_value", "loss_actor"):
        torch.testing.assert_close(a[key], b[key])


def test_vmap_and_loop_agree():
    loss = make_loss()
    looped = make_loss(deactivate_vmap=True)
    looped.load_state_dict(loss.state_dict())
    data = make_batch()
    torch.manual_seed(7)
    a = loss(data)
    torch.manual_seed(7)
    b = looped(data)
    for key in ("loss_qvalue", "loss_value", "loss_actor", "loss_behavior", "path_kl"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_chunk_sizes():
    """Near-equal chunks of the leading dim, each within the row limit; None where no split applies."""
    obs, act, step = torch.zeros(10, 4, 3), torch.zeros(10, 4, 2), torch.zeros(10, 4, dtype=torch.long)
    assert chunk_sizes([obs, act, step], 12) == [3, 3, 2, 2]  # 3 states x 4 samples per chunk at most
    assert chunk_sizes([obs, act, step], 20) == [5, 5]
    assert chunk_sizes([obs, act, step], 3) == [1] * 10  # a state's samples are never split
    assert chunk_sizes([obs, act, step], 40) is None  # fits
    assert chunk_sizes([obs, act, step], None) is None
    assert chunk_sizes([torch.zeros(22, 3), torch.zeros(22, 2)], 5) == [5, 5, 4, 4, 4]  # flat rows
    assert chunk_sizes([obs, torch.zeros(9, 4, 2)], 4) is None  # leading dims differ
    assert chunk_sizes([obs, 3], 4) is None  # an int step
    assert chunk_sizes([obs.to("meta"), act.to("meta")], 4) is None  # not on a CPU


@pytest.mark.parametrize("rows", [1, 7, 12])
@pytest.mark.parametrize("vmap", [True, False])
def test_ensemble_chunks_match_one_call(rows, vmap, chunk_calls):
    """Q and V ensembles in row chunks: one call's values and every gradient (actions, parameters)."""
    whole = make_loss(speed=SpeedOptions(ensemble_chunk_rows=None), deactivate_vmap=not vmap)
    chunked = make_loss(speed=SpeedOptions(ensemble_chunk_rows=rows), deactivate_vmap=not vmap)
    chunked.load_state_dict(whole.state_dict())
    g = torch.Generator().manual_seed(5)
    B = 6
    obs = torch.randn(B, 1, OBS, generator=g).expand(B, M, OBS)
    act0 = torch.rand(B, M, ACT, generator=g) * 2 - 1
    step = torch.randint(0, N + 1, (B, 1), generator=g).expand(B, M)
    out, grads = {}, {}
    for name, loss in (("whole", whole), ("chunked", chunked)):
        act = act0.clone().requires_grad_()
        v = loss._value(loss.value_network_params, obs, act, step)
        q = loss._qvalue(loss.qvalue_network_params, obs, act)
        assert v.shape == q.shape == (K, B, M)
        (v.square().sum() + q.sum()).backward()
        out[name] = (v.detach(), q.detach())
        grads[name] = {"action": act.grad, **{k: p.grad for k, p in loss.named_parameters() if p.grad is not None}}
    expected = [[max(1, rows // M)] * (B // max(1, rows // M))] * 2
    assert [sizes for sizes, _ in chunk_calls] == expected  # V then Q, each split as chunk_sizes says
    for a, b in zip(out["whole"], out["chunked"]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert grads["whole"].keys() == grads["chunked"].keys() and len(grads["whole"]) > 2
    for key, gw in grads["whole"].items():  # sums over other chunkings: rounding relative to the scale
        scale = gw.abs().max().item()
        torch.testing.assert_close(grads["chunked"][key], gw, rtol=1e-5, atol=1e-6 * scale, msg=key)


def test_compiled_chunks_keep_a_graph_per_shape_past_dynamos_default_limit():
    """Ten chunk shapes (more than dynamo's default recompile limit of 8): each gets its compiled
    graph, none falls back to eager, and dynamo's own limit is left as it was."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from torchrl_bdpo.speed import chunks as utils

    loss = make_loss(num_qvalue_nets=2)
    code = utils._ensemble_members.__code__
    before = len(_debug_get_cache_entry_list(code))
    limit = torch._dynamo.config.recompile_limit
    obs = torch.randn(97, OBS)
    act = torch.randn(97, ACT)
    for rows in range(83, 93):  # one chunk of `rows` rows (and one of 97 - rows): two new shapes at most
        out = utils.ensemble_apply_chunked(
            loss.qvalue_network, loss.qvalue_network_params, [obs, act], 2, [rows, 97 - rows], compile_options={"backend": "eager"}
        )
        assert out.shape == (2, 97, 1)
    assert len(_debug_get_cache_entry_list(code)) - before >= 10
    assert torch._dynamo.config.recompile_limit == limit


def test_ensemble_chunks_keep_the_loss(chunk_calls):
    """A whole forward with chunked target ensembles: the same losses, diagnostics and gradients."""
    whole = make_loss(speed=SpeedOptions(ensemble_chunk_rows=None))
    chunked = make_loss(speed=SpeedOptions(ensemble_chunk_rows=2 * M))  # 2 states per chunk: 4 chunks of the 8 x M samples
    chunked.load_state_dict(whole.state_dict())
    data = make_batch(terminated=torch.tensor([[True], [False]] * 4))
    outs = {}
    for name, loss in (("whole", whole), ("chunked", chunked)):
        torch.manual_seed(7)
        outs[name] = loss(data)
        sum(outs[name][k] for k in ("loss_qvalue", "loss_value", "loss_actor", "loss_behavior")).backward()
    # the Q target over the 4 live next states x M samples: 2 states a chunk; then eager's
    # V_{n-1} (and Q at n = 1) of the value and actor targets, on flat rows: 8 rows a chunk
    sizes = [c for c, _ in chunk_calls]
    assert len(sizes) >= 3 and sizes[0] == [2, 2], sizes
    assert all(max(c) <= 8 < sum(c) for c in sizes[1:]), sizes
    for key in outs["whole"].keys():
        torch.testing.assert_close(outs["chunked"][key], outs["whole"][key], rtol=1e-5, atol=1e-6, msg=key)
    chunked_params = dict(chunked.named_parameters())
    for name, p in whole.named_parameters():
        assert (p.grad is None) == (chunked_params[name].grad is None), name
        if p.grad is not None:
            scale = p.grad.abs().max().item()
            torch.testing.assert_close(chunked_params[name].grad, p.grad, rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_terminated_target_is_reward_and_truncated_bootstraps():
    loss = make_loss()
    term = torch.ones(8, 1, dtype=torch.bool)
    data = make_batch(terminated=term)
    target, _, kl_per_step = loss.qvalue_target(data)
    torch.testing.assert_close(target, data["next", "reward"].squeeze(-1))
    assert torch.isnan(kl_per_step).all()  # no path was sampled
    assert torch.isnan(loss.qvalue_loss(data)[1]["path_kl"])

    trunc = torch.ones(8, 1, dtype=torch.bool)
    data = make_batch(truncated=trunc)  # done but not terminated
    noise = torch.randn(N + 1, 8, M, ACT)
    target, _, _ = loss.qvalue_target(data, noise=noise)
    next_value, _, _ = loss.next_state_value(data["next", "observation"], data["next", "terminated"], noise=noise)
    torch.testing.assert_close(target, data["next", "reward"].squeeze(-1) + 0.99 * next_value)
    assert (target - data["next", "reward"].squeeze(-1)).abs().min() > 0


def test_all_terminal_flag_samples_no_path_and_refuses_live_rows(monkeypatch):
    """``all_terminal=True`` (what compiled CPU steps pass for bandit batches) gives eager's skip
    result without sampling a path, in eager code and in a compiled graph; a live row is an error."""
    loss = make_loss()
    term = torch.ones(8, 1, dtype=torch.bool)
    data = make_batch(terminated=term)
    torch.manual_seed(3)
    ref = loss.qvalue_loss(data)
    ref_rng = torch.get_rng_state()

    def no_path(*args, **kwargs):
        raise AssertionError("a Q-target path was sampled for an all-terminal batch")

    monkeypatch.setattr(loss.actor_network, "sample_path", no_path)
    for fn in (loss.qvalue_loss, torch.compile(loss.qvalue_loss, backend="aot_eager", fullgraph=True)):
        torch.manual_seed(3)
        out = fn(data, all_terminal=True)
        torch.testing.assert_close(out[0], ref[0])
        for key in ("qvalue_pred", "qvalue_target", "path_kl", "kl_per_step"):
            torch.testing.assert_close(out[1][key], ref[1][key], equal_nan=True, msg=key)
        assert torch.equal(torch.get_rng_state(), ref_rng)  # the same draws as eager's skip
    live = make_batch(terminated=torch.tensor([[True], [False]] * 4))
    with pytest.raises(ValueError, match=r"all_terminal=True, but 4 of 8 next states are not terminated"):
        loss.qvalue_loss(live, all_terminal=True)


def test_skipping_terminal_next_states_changes_no_target():
    term = torch.tensor([True, False, True, True, False, False, True, False]).unsqueeze(-1)
    data = make_batch(terminated=term)
    noise = torch.randn(N + 1, 8, M, ACT)
    skip = make_loss(skip_terminal_next=True)
    full = make_loss(skip_terminal_next=False)
    full.load_state_dict(skip.state_dict())
    a = skip.qvalue_target(data, noise=noise)
    b = full.qvalue_target(data, noise=noise)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert (a[0][term.squeeze(-1)] == data["next", "reward"].squeeze(-1)[term.squeeze(-1)]).all()


def test_path_kl_matches_pathwise_kl_loss_and_q_target_by_hand():
    loss = make_loss(aggregation="lcb", rho=1.0)
    data = make_batch()
    noise = torch.randn(N + 1, 8, M, ACT)
    value, path_kl, per_step = loss.next_state_value(data["next", "observation"], data["next", "terminated"], noise=noise)
    # targets start as copies of the online networks
    kl_loss = PathwiseKLLoss(loss.actor_network, loss.behavior_network)
    kl, kl_steps, path = kl_loss.path_kl(data["next", "observation"], num_samples=M, noise=noise)
    torch.testing.assert_close(path_kl, kl.mean(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_step, kl_steps.mean((1, 2)), rtol=1e-5, atol=1e-6)
    # Q ensemble member by member, by hand
    q_op = loss.qvalue_network
    obs_m = data["next", "observation"].unsqueeze(1).expand(8, M, OBS)
    qs = []
    for k in range(K):
        with loss.target_qvalue_network_params[k].to_module(q_op):
            qs.append(q_op.module(obs_m, path.action).squeeze(-1).mean(-1))
    qs = torch.stack(qs)
    lcb = qs.mean(0) - 1.0 * qs.std(0, correction=0)
    torch.testing.assert_close(value, lcb - 0.2 * kl.mean(-1), rtol=1e-5, atol=1e-5)


def test_qvalue_target_rho_weighs_the_q_target_alone():
    """``qvalue_target_rho`` replaces ``rho`` in the Q TD target only: with rho 1 and 0 there, the Q
    target is rho 0's (the ensemble mean, by hand) while the V target and the actor's objective keep
    rho 1's lower bound; ``None`` is the paper's single rho."""
    data = make_batch()
    noise = torch.randn(N + 1, 8, M, ACT)
    paper, split, plain = make_loss(rho=1.0), make_loss(rho=1.0, qvalue_target_rho=0.0), make_loss(rho=0.0)
    assert paper.qvalue_target_rho == 1.0 and split.qvalue_target_rho == 0.0
    y = {name: lo.qvalue_target(data, noise=noise)[0] for name, lo in (("paper", paper), ("split", split), ("plain", plain))}
    torch.testing.assert_close(y["split"], y["plain"])
    assert (y["paper"] < y["split"]).all()  # the lower bound sits below the mean wherever the members differ
    # the mean over members, by hand
    _, _, path = PathwiseKLLoss(split.actor_network, split.behavior_network).path_kl(data["next", "observation"], num_samples=M, noise=noise)
    obs_m = data["next", "observation"].unsqueeze(1).expand(8, M, OBS)
    q_op, qs = split.qvalue_network, []
    for k in range(K):
        with split.target_qvalue_network_params[k].to_module(q_op):
            qs.append(q_op.module(obs_m, path.action).squeeze(-1).mean(-1))
    kl = split.next_state_value(data["next", "observation"], data["next", "terminated"], noise=noise)[1]
    torch.testing.assert_close(y["split"], data["next", "reward"].squeeze(-1) + 0.99 * (torch.stack(qs).mean(0) - 0.2 * kl), rtol=1e-5, atol=1e-5)
    # V's target and the actor's objective: the same lower bound as the paper's loss
    obs, action_n = data["observation"], data["action"]
    n = torch.randint(1, N + 1, (8,), generator=torch.Generator().manual_seed(0))
    outs = {}
    for name, lo in (("paper", paper), ("split", split), ("plain", plain)):
        torch.manual_seed(5)
        outs[name] = lo.one_step_objective(obs, action_n, n)[0]
    torch.testing.assert_close(outs["split"], outs["paper"])
    assert (outs["split"] < outs["plain"]).all()


def test_identical_actor_and_behavior_have_zero_kl():
    loss = make_loss()
    loss.behavior_network_params.data.copy_(loss.actor_network_params.data)
    loss.target_behavior_network_params.data.copy_(loss.actor_network_params.data)
    data = make_batch()
    _, path_kl, per_step = loss.qvalue_target(data)
    assert path_kl.abs().max() < 1e-10 and per_step.abs().max() < 1e-10
    assert loss.value_loss(data)[1]["value_step_kl"].abs() < 1e-10


def test_max_q_backup_and_aggregations():
    x = torch.tensor([[1.0, 3.0], [2.0, 5.0], [0.0, 4.0]])
    torch.testing.assert_close(aggregate_ensemble(x, "mean"), torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(aggregate_ensemble(x, "min"), torch.tensor([0.0, 3.0]))
    std = x.std(0, correction=0)
    torch.testing.assert_close(aggregate_ensemble(x, "lcb", rho=2.0), x.mean(0) - 2 * std)
    data = make_batch()
    noise = torch.randn(N + 1, 8, M, ACT)
    mean_q = make_loss(eta=1e-9, rho=0.0)
    max_q = make_loss(eta=1e-9, rho=0.0, max_q_backup=True)
    max_q.load_state_dict(mean_q.state_dict())
    v_mean = mean_q.next_state_value(data["next", "observation"], data["next", "terminated"], noise=noise)[0]
    v_max = max_q.next_state_value(data["next", "observation"], data["next", "terminated"], noise=noise)[0]
    assert (v_max > v_mean).all()


def test_gamma_through_value_estimator():
    from torchrl.objectives.utils import ValueEstimators

    loss = make_loss(gamma=0.9)
    data = make_batch()
    noise = torch.randn(N + 1, 8, M, ACT)
    nv = loss.next_state_value(data["next", "observation"], data["next", "terminated"], noise=noise)[0]
    r = data["next", "reward"].squeeze(-1)
    torch.testing.assert_close(loss.qvalue_target(data, noise=noise)[0], r + 0.9 * nv)
    loss.make_value_estimator(ValueEstimators.TD0, gamma=0.5)
    torch.testing.assert_close(loss.qvalue_target(data, noise=noise)[0], r + 0.5 * nv)
    with pytest.raises(NotImplementedError, match="TD1"):
        loss.make_value_estimator(ValueEstimators.TD1)


def test_target_updaters_move_only_their_group():
    loss = make_loss()
    critics, actor_up, behavior_up = loss.make_target_updaters(tau=0.5)
    params = dict(loss.named_parameters())
    before = {n: b.clone() for n, b in loss.named_buffers() if n.startswith("target_") and n[len("target_") :] in params}
    assert len(before) == len(params)
    with torch.no_grad():
        for p in loss.parameters():
            p.add_(1.0)
    critics.step()
    after = dict(loss.named_buffers())
    for name, old in before.items():
        moved = not torch.equal(after[name], old)
        should = name.startswith(("target_qvalue", "target_value"))
        assert moved == should, name
        if should:  # every entry, paired by name: 0.5 old + 0.5 online
            torch.testing.assert_close(after[name], 0.5 * old + 0.5 * params[name[len("target_") :]].data, msg=name)
    actor_up.step()
    behavior_up.step()
    after = dict(loss.named_buffers())
    for name, old in before.items():
        if name.startswith(("target_actor", "target_behavior")):
            torch.testing.assert_close(after[name], 0.5 * old + 0.5 * params[name[len("target_") :]].data, msg=name)
    # the updaters follow parameters that a dtype (or device) change replaced
    loss = loss.double()
    online = {n: p.detach().clone() for n, p in [*loss.named_parameters(), *loss.named_buffers()]}
    old = {n: b.clone() for n, b in loss.named_buffers() if n.startswith("target_actor")}
    actor_up.step()
    for name, b in loss.named_buffers():
        if name in old:
            assert b.dtype == torch.float64
            torch.testing.assert_close(b, 0.5 * old[name] + 0.5 * online[name[len("target_") :]], msg=name)


def test_target_updater_cache_follows_replaced_parameters():
    # the updater reuses the leaves it walked while nothing can have replaced them; a
    # replaced container or a dtype change (which replaces the tensors) is walked again
    loss = make_loss()
    _, actor_up, _ = loss.make_target_updaters(tau=0.5)
    actor_up.step()
    assert actor_up._leaves is not None  # cached after the first step
    targets = actor_up._leaves[2]
    actor_up.step()
    assert actor_up._leaves[2] is targets  # reused: nothing changed

    def check(step):
        online = {k: v.detach().clone() for k, v in loss.actor_network_params.items(True, True)}
        old = {k: v.clone() for k, v in loss.target_actor_network_params.items(True, True)}
        step()
        for key, value in loss.target_actor_network_params.items(True, True):
            torch.testing.assert_close(value, 0.5 * old[key] + 0.5 * online[key], msg=str(key))

    fresh = TensorDictParams(loss.target_actor_network_params.data.clone().zero_(), no_convert=True)
    loss.target_actor_network_params = fresh
    check(actor_up.step)  # the new container is the one moved
    assert loss.target_actor_network_params is fresh and actor_up._leaves[0][1] is fresh
    version = loss._params_version
    loss.double()  # new tensors in the same containers
    assert loss._params_version == version + 1
    check(actor_up.step)
    assert all(t.dtype == torch.float64 for t in loss.target_actor_network_params.values(True, True))


def test_target_updater_refuses_mismatched_targets():
    class Holder:
        _has_update_associated = {}

    holder = Holder()
    holder.net_params = TensorDict({"w": torch.zeros(2), "b": torch.zeros(1)}, [])
    holder.target_net_params = TensorDict({"b": torch.zeros(1), "w": torch.zeros(2)}, [])
    with pytest.raises(ValueError, match=r"net_params and target_net_params hold different entries"):
        TargetSoftUpdate(holder, ("net",))
    holder.target_net_params = TensorDict({"w": torch.ones(2), "b": torch.ones(1)}, [])
    up = TargetSoftUpdate(holder, ("net",), tau=0.25)
    up.step()
    torch.testing.assert_close(holder.target_net_params["w"], torch.full((2,), 0.75))
    holder.net_params = TensorDict({"w": torch.zeros(2)}, [])
    with pytest.raises(RuntimeError, match="has 1 entries but target_net_params 2"):
        up.step()


def target_actor_actions(loss, obs, seed, num_samples=None):
    """The target actor's reverse-chain actions for ``obs`` after ``torch.manual_seed(seed)``: what the
    acting module draws from the same seed (``[B, A]``, or ``[B, num_samples, A]``)."""
    torch.manual_seed(seed)
    with loss.target_actor_network_params.to_module(loss.actor_network):
        return loss.actor_network.sample_path(obs, num_samples=num_samples).action


def target_ensemble_q(loss, obs, cands):
    """Each target critic's Q of ``cands`` ``[B, N, A]`` at ``obs`` ``[B, S]``, one critic at a time: ``[K, B, N]``."""
    obs_m = obs.unsqueeze(1).expand(*cands.shape[:2], obs.shape[-1])
    qs = []
    for j in range(loss.num_qvalue_nets):
        with loss.target_qvalue_network_params[j].to_module(loss.qvalue_network):
            qs.append(loss.qvalue_network.module(obs_m, cands).squeeze(-1))
    return torch.stack(qs)


def test_acting_module():
    loss = make_loss()
    acting = loss.make_acting_module(num_candidates=6)
    obs = torch.randn(5, OBS)
    td = TensorDict({"observation": obs}, [5])
    with set_exploration_type(ExplorationType.RANDOM):
        torch.manual_seed(4)
        one = acting(td.clone())["action"]
    torch.testing.assert_close(one, target_actor_actions(loss, obs, seed=4))
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        torch.manual_seed(4)
        best = acting(td.clone())["action"]
    cands = target_actor_actions(loss, obs, seed=4, num_samples=6)
    obs_m = obs.unsqueeze(1).expand(5, 6, OBS)
    q = torch.stack([loss.qvalue_network.module(obs_m, cands) for _ in [0]])  # shape check only; the ensemble mean is computed below
    idx = target_ensemble_q(loss, obs, cands).mean(0).argmax(-1)
    torch.testing.assert_close(best, cands[torch.arange(5), idx])
    assert q.shape == (1, 5, 6, 1)
    # actor_params: the online actor acts instead of its target (they differ after a step)
    with torch.no_grad():
        for p in loss.actor_network_params.values(True, True):
            p.add_(0.1 * torch.randn_like(p))
    online = loss.make_acting_module(num_candidates=6, actor_params=loss.actor_network_params)
    with set_exploration_type(ExplorationType.RANDOM):
        torch.manual_seed(4)
        got = online(td.clone())["action"]
    torch.manual_seed(4)
    with loss.actor_network_params.to_module(loss.actor_network):
        want = loss.actor_network.sample_path(obs).action
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, one)


def test_acting_module_ranks_by_the_chosen_aggregation():
    """``aggregation``/``rho`` of best-of-K: the argmax of the ensemble's mean, min or LCB, computed by hand."""
    loss = make_loss()
    rows, cands_per_row = 64, 6
    obs = torch.randn(rows, OBS)
    td = TensorDict({"observation": obs}, [rows])
    cands = target_actor_actions(loss, obs, seed=4, num_samples=cands_per_row)
    qs = target_ensemble_q(loss, obs, cands)
    by_hand = {("mean", 0.0): qs.mean(0), ("min", 0.0): qs.min(0).values, ("lcb", 1.5): qs.mean(0) - 1.5 * qs.std(0, correction=0)}
    chosen = {}
    for (aggregation, rho), values in by_hand.items():
        acting = loss.make_acting_module(num_candidates=cands_per_row, aggregation=aggregation, rho=rho)
        torch.manual_seed(4)
        with set_exploration_type(ExplorationType.DETERMINISTIC):
            best = acting(td.clone())["action"]
        idx = values.argmax(-1)
        torch.testing.assert_close(best, cands[torch.arange(rows), idx])
        chosen[aggregation] = idx
    # the rules disagree somewhere, so the test would see an aggregation that is ignored
    assert (chosen["min"] != chosen["mean"]).any() and (chosen["lcb"] != chosen["mean"]).any()


def test_acting_module_average_is_the_mean_of_the_candidates():
    """``selection="average"``: the mean of the same K candidates best-of-K would rank (Q unused);
    ``RANDOM`` still returns one sample."""
    loss = make_loss()
    rows, k = 32, 5
    obs = torch.randn(rows, OBS)
    td = TensorDict({"observation": obs}, [rows])
    cands = target_actor_actions(loss, obs, seed=7, num_samples=k)
    one = target_actor_actions(loss, obs, seed=8)
    acting = loss.make_acting_module(num_candidates=k, selection="average")
    torch.manual_seed(7)
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        avg = acting(td.clone())["action"]
    torch.testing.assert_close(avg, cands.mean(1))
    assert not torch.allclose(avg, cands[:, 0])  # not one of the candidates
    torch.manual_seed(8)
    with set_exploration_type(ExplorationType.RANDOM):
        torch.testing.assert_close(acting(td.clone())["action"], one)


def test_acting_module_elite_is_the_mean_of_the_best_by_q():
    """``selection="elite"``: the mean of the ``num_elite`` candidates with the best ensemble-mean
    Q, by hand; ``num_elite=1`` is best-of-K and ``num_elite=K`` the plain average."""
    loss = make_loss()
    rows, k = 64, 6
    obs = torch.randn(rows, OBS)
    td = TensorDict({"observation": obs}, [rows])
    cands = target_actor_actions(loss, obs, seed=4, num_samples=k)
    order = target_ensemble_q(loss, obs, cands).mean(0).argsort(-1, descending=True)

    def act(**kwargs):
        torch.manual_seed(4)
        with set_exploration_type(ExplorationType.DETERMINISTIC):
            return loss.make_acting_module(num_candidates=k, **kwargs)(td.clone())["action"]

    top3 = cands[torch.arange(rows)[:, None], order[:, :3]].mean(1)
    torch.testing.assert_close(act(selection="elite", num_elite=3), top3)
    assert not torch.allclose(top3, cands.mean(1)) and not torch.allclose(top3, cands[torch.arange(rows), order[:, 0]])
    torch.testing.assert_close(act(selection="elite", num_elite=1), act())
    torch.testing.assert_close(act(selection="elite", num_elite=k), act(selection="average"))


def test_selection_probe_pool_ranks_the_actors_and_the_behaviors_candidates_together():
    """benchmarks/selection_probe.py's ``pooled`` source: K of the target actor's candidates and K of
    the behavior EMA's, drawn in that order, one argmax (or elite mean) of the ensemble-mean Q over
    the 2K, by hand; ``picks`` counts the chosen candidates that were the actor's."""
    from tests.loaders import load_benchmark

    probe = load_benchmark("selection_probe")
    loss = make_loss()
    rows, k = 64, 3
    obs = torch.randn(rows, OBS)
    torch.manual_seed(5)
    with loss.target_actor_network_params.to_module(loss.actor_network):
        own = loss.actor_network.sample_path(obs, num_samples=k).action
    with loss.target_behavior_network_params.to_module(loss.behavior_network):
        ref = loss.behavior_network.sample_path(obs, num_samples=k).action
    pool = torch.cat([own, ref], 1)
    order = target_ensemble_q(loss, obs, pool).mean(0).argsort(-1, descending=True)
    td = TensorDict({"observation": obs}, [rows])

    def act(**kwargs):
        policy = probe.pooled_select(
            loss.actor_network,
            loss.target_actor_network_params,
            loss.behavior_network,
            loss.target_behavior_network_params,
            qvalue_network=loss.qvalue_network,
            qvalue_params=loss.target_qvalue_network_params,
            num_qvalue_nets=loss.num_qvalue_nets,
            num_candidates=k,
            **kwargs,
        )
        torch.manual_seed(5)
        with set_exploration_type(ExplorationType.DETERMINISTIC):
            return policy(td.clone())["action"], policy.picks.tolist()

    best, picks = act()
    torch.testing.assert_close(best, pool[torch.arange(rows), order[:, 0]])
    from_actor = int((order[:, 0] < k).sum())
    assert 0 < from_actor < rows and picks == [from_actor, rows]  # each source wins somewhere
    top2, picks = act(selection="elite", num_elite=2)
    torch.testing.assert_close(top2, pool[torch.arange(rows)[:, None], order[:, :2]].mean(1))
    assert picks == [int((order[:, :2] < k).sum()), 2 * rows]
    rules = [probe.parse_rule(r) for r in ("mean/3", "one", "avg/3")]
    with pytest.raises(ValueError, match=re.escape("--candidates pooled with rules ['one', 'avg/3']")):
        probe.check_pooled_rules(rules, ["actor", "pooled"])
    probe.check_pooled_rules(rules, ["actor", "behavior"])  # the unranked rules are fine without a pool


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(selection="mode"), "selection='mode'"),
        (dict(aggregation="median"), "aggregation='median'"),
        (dict(rho=-0.5, aggregation="lcb"), "rho=-0.5"),
        (dict(rho=float("nan"), aggregation="lcb"), "rho=nan"),
        (dict(rho=1.0), "rho=1.0 with aggregation='mean'"),
        (dict(num_candidates=0), "num_candidates=0"),
        (dict(selection="average", aggregation="lcb", rho=1.0), "selection='average' with aggregation='lcb', rho=1.0"),
        (dict(selection="average", aggregation="min"), "selection='average' with aggregation='min', rho=0.0"),
        (dict(selection="elite"), "num_elite=None with selection='elite': expected an integer in [1, 10]"),
        (dict(selection="elite", num_elite=11), "num_elite=11 with selection='elite'"),
        (dict(selection="elite", num_elite=0), "num_elite=0 with selection='elite'"),
        (dict(num_elite=3), "num_elite=3 with selection='q'"),
    ],
)
def test_acting_module_bad_selection(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        make_loss().make_acting_module(**kwargs)


def _next_spread_by_hand(loss, data, noise):
    """The target critics' mean and population std at the next states' sampled actions (mean over M)."""
    _, _, path = PathwiseKLLoss(loss.actor_network, loss.behavior_network).path_kl(data["next", "observation"], num_samples=M, noise=noise)
    obs_m = data["next", "observation"].unsqueeze(1).expand(-1, M, OBS)
    q_op, qs = loss.qvalue_network, []
    for k in range(K):
        with loss.target_qvalue_network_params[k].to_module(q_op):
            qs.append(q_op.module(obs_m, path.action).squeeze(-1).mean(-1))
    qs = torch.stack(qs).detach()
    return qs.mean(0), qs.std(0, correction=0)


@pytest.mark.parametrize("skip_terminal_next", [True, False])
def test_qvalue_target_pessimism_costs_its_share_of_the_reward(skip_terminal_next):
    """``qvalue_target_pessimism=kappa``: the Q target's LCB weight is ``kappa mean|r| / (gamma
    mean std)`` over the live next states (by hand), so the pessimism ``gamma rho std`` costs kappa of
    the mean |reward| on average; the targets equal a fixed ``qvalue_target_rho`` of that weight,
    and the critic step logs it. Terminal rows neither pay nor count, with the skip and without."""
    terminated = torch.tensor([False, True, False, False, True, False, False, False]).unsqueeze(-1)
    data = make_batch(terminated=terminated)
    data["next", "reward"] = data["next", "reward"] * 3 + 1  # a non-zero mean and mixed signs
    noise = torch.randn(N + 1, 8, M, ACT)
    kappa, gamma = 0.4, 0.95
    loss = make_loss(rho=2.0, gamma=gamma, qvalue_target_pessimism=kappa, skip_terminal_next=skip_terminal_next)
    mean, std = _next_spread_by_hand(loss, data, noise)
    live = ~terminated.squeeze(-1)
    rho_q = kappa * data["next", "reward"].abs().mean() / (gamma * std[live].mean())
    torch.testing.assert_close(gamma * rho_q * std[live].mean(), kappa * data["next", "reward"].abs().mean())
    target, path_kl, _ = loss.qvalue_target(data, noise=noise)
    want = data["next", "reward"].squeeze(-1) + gamma * live * (mean - rho_q * std - 0.2 * path_kl)
    torch.testing.assert_close(target, want, rtol=1e-5, atol=1e-5)
    fixed = make_loss(rho=2.0, gamma=gamma, qvalue_target_rho=float(rho_q), skip_terminal_next=skip_terminal_next)
    torch.testing.assert_close(fixed.qvalue_target(data, noise=noise)[0], target, rtol=1e-5, atol=1e-5)
    # the critic step logs its own batch's weight (its paths draw noise first: seed 3's)
    torch.manual_seed(3)
    _, std3 = _next_spread_by_hand(loss, data, torch.randn(N + 1, 8, M, ACT))
    torch.manual_seed(3)
    _, meta = loss.qvalue_loss(data)
    torch.testing.assert_close(meta["qvalue_target_rho"], kappa * data["next", "reward"].abs().mean() / (gamma * std3[live].mean()), rtol=1e-5, atol=0)
    # the fixed weight is logged as it is
    torch.manual_seed(3)
    assert float(fixed.qvalue_loss(data)[1]["qvalue_target_rho"]) == pytest.approx(float(rho_q))


def test_qvalue_target_pessimism_with_no_live_next_state():
    """A batch whose next states are all terminal: the target is the reward, finite, and the logged
    weight is NaN (nothing bootstraps), as the path KL is."""
    data = make_batch(terminated=torch.ones(8, 1, dtype=torch.bool))
    for skip in (True, False):
        loss = make_loss(qvalue_target_pessimism=0.5, skip_terminal_next=skip)
        target, _, _ = loss.qvalue_target(data)
        torch.testing.assert_close(target, data["next", "reward"].squeeze(-1))
        assert torch.isnan(loss.qvalue_loss(data)[1]["qvalue_target_rho"])
    with pytest.raises(ValueError, match=r"qvalue_target_pessimism=0.5: the Q target's LCB weight is set from the batch's rewards; pass reward="):
        loss.next_state_value(data["next", "observation"], data["next", "terminated"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(qvalue_target_pessimism=1.0), r"qvalue_target_pessimism=1.0: expected a number in \[0, 1\)"),
        (dict(qvalue_target_pessimism=-0.1), r"qvalue_target_pessimism=-0.1: expected a number in \[0, 1\)"),
        (dict(qvalue_target_pessimism=True), r"qvalue_target_pessimism=True: expected a number"),
        (dict(rho=0.0, aggregation="min", qvalue_target_pessimism=0.5), r"qvalue_target_pessimism=0.5 with aggregation='min': .* set aggregation=lcb"),
        (dict(qvalue_target_pessimism=0.5, qvalue_target_rho=1.0), r"qvalue_target_pessimism=0.5 and qvalue_target_rho=1.0 both set .* choose one"),
    ],
)
def test_bad_pessimism_share(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_loss(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eta=0.0), "eta=0.0"),
        (dict(eta=-1.0), "eta=-1.0"),
        (dict(num_qvalue_nets=0), "num_qvalue_nets=0"),
        (dict(num_samples=0), "num_samples=0"),
        (dict(aggregation="median"), "aggregation='median'"),
        (dict(rho=-1.0), "rho=-1.0"),
        (dict(rho=float("inf")), "rho=inf"),
        (dict(rho=1.0, aggregation="min"), "rho=1.0 with aggregation='min'"),
        (dict(gamma=1.5), "gamma=1.5"),
        (dict(qvalue_target_rho=-0.5), "qvalue_target_rho=-0.5: expected a finite number >= 0"),
        (dict(qvalue_target_rho=float("nan")), "qvalue_target_rho=nan"),
        (dict(rho=0.0, aggregation="min", qvalue_target_rho=1.0), "qvalue_target_rho=1.0 with aggregation='min': qvalue_target_rho weighs the std"),
        (dict(step_sampling="sobol"), r"step_sampling='sobol': expected one of \('uniform', 'stratified'\)"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_loss(**kwargs)


@pytest.mark.parametrize("rows", [0, 2.5, True, "all"])
def test_bad_speed_options(rows):
    with pytest.raises(ValueError, match=rf"ensemble_chunk_rows={rows!r}: expected an integer >= 1"):
        SpeedOptions(ensemble_chunk_rows=rows)
    with pytest.raises(TypeError, match=r"q_target_rows=1: expected True or False"):
        SpeedOptions(q_target_rows=1)
    with pytest.raises(TypeError, match=r"speed=\{'ensemble_chunk_rows': 8\}: expected a torchrl_bdpo.speed.SpeedOptions"):
        make_loss(speed={"ensemble_chunk_rows": 8})


def test_speed_options_of_the_loss_and_their_deprecated_keywords():
    """``speed`` is the loss's, unchanged; the old ``ensemble_chunk_*`` keywords still build the same
    options (``None`` still means never split) with a DeprecationWarning, and not next to ``speed``."""
    speed = SpeedOptions(ensemble_chunk_rows=8, q_target_rows=False)
    assert make_loss(speed=speed).speed is speed
    assert make_loss().speed == SpeedOptions()
    assert SpeedOptions().chunk_rows(K) == 6400 // K and SpeedOptions(ensemble_chunk_rows=None).chunk_rows(K) is None
    with pytest.warns(DeprecationWarning, match="ensemble_chunk_rows= and ensemble_chunk_compile= are deprecated"):
        old = make_loss(ensemble_chunk_rows=None, ensemble_chunk_compile={"mode": "default"})
    assert old.speed == SpeedOptions(ensemble_chunk_rows=None, ensemble_chunk_compile={"mode": "default"})
    assert old.speed.ensemble_chunk_compile == {"mode": "default"}
    with pytest.warns(DeprecationWarning):
        assert make_loss(ensemble_chunk_compile={}).speed.ensemble_chunk_rows == "auto"
    with pytest.raises(ValueError, match="got both speed= and the deprecated ensemble_chunk_rows"):
        make_loss(speed=speed, ensemble_chunk_rows=4)


@pytest.mark.parametrize("batch_shape", [(13,), (3, 5)])
def test_stratified_split_values_each_row_as_the_row_by_row_split_does(batch_shape):
    """``_next_value`` with the rows of a stratified draw (Q on the step-1 rows, V on the others)
    equals eager's row-by-row split (``nonzero``), values and gradients to the actions, with an
    ensemble of each kind evaluated once on its own rows."""
    from torchrl_bdpo.diffusion import stratified_steps

    loss = make_loss(step_sampling="stratified")
    torch.manual_seed(0)
    split = stratified_steps(batch_shape, N)
    obs = torch.randn(*batch_shape, OBS).unsqueeze(-2).expand(*batch_shape, M, OBS)
    step_prev = (split.steps - 1).unsqueeze(-1).expand(*batch_shape, M)
    action = torch.randn(*batch_shape, M, ACT, requires_grad=True)
    ref = loss._next_value(obs, action, step_prev)
    calls = []
    for name in ("_qvalue", "_value"):
        method = getattr(loss, name)
        setattr(loss, name, lambda *a, _m=method, _n=name: calls.append((_n, a[-1].shape[0] if _n == "_qvalue" else a[-2].shape[0])) or _m(*a))
    out = loss._next_value(obs, action, step_prev, split)
    R = torch.Size(batch_shape).numel()
    assert sorted(calls) == [("_qvalue", split.first_rows.numel()), ("_value", R - R // N)]
    assert out.shape == ref.shape == (K, *batch_shape, M)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), action)
    (g_out,) = torch.autograd.grad((out * w).sum(), action)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-5)
    observation, action_n = torch.randn(*batch_shape, OBS), torch.randn(*batch_shape, ACT)
    with pytest.raises(ValueError, match=r"split.steps has shape \(4,\) but n has"):
        loss.one_step_objective(observation, action_n, split.steps, split=stratified_steps((4,), N))
    with pytest.raises(ValueError, match=r"split covers 1 \+ 0 rows but the batch has"):
        loss._next_value(obs, action, step_prev, split._replace(first_rows=split.first_rows[:1], later_rows=split.later_rows[:0]))


def test_stratified_losses_draw_balanced_steps_and_train():
    """``step_sampling="stratified"``: the V and actor objectives get balanced steps and their split;
    each loss still reaches its own network only."""
    loss = make_loss(step_sampling="stratified")
    seen = []
    original = loss.one_step_objective

    def spy(observation, action_n, n, actor_params=None, split=None):
        seen.append((n.clone(), split))
        return original(observation, action_n, n, actor_params, split=split)

    loss.one_step_objective = spy
    data = make_batch(B=12)
    for method, owner in (("value_loss", "value_network_params"), ("actor_loss", "actor_network_params")):
        loss.zero_grad()
        value, _ = getattr(loss, method)(data)
        value.backward()
        assert grads_by_network(loss) == {**{k: False for k in grads_by_network(loss)}, owner: True}
    assert len(seen) == 2
    for n, split in seen:
        assert split is not None and torch.equal(n, split.steps)
        assert sorted(torch.bincount(n, minlength=N + 1)[1:].tolist()) == sorted([12 // N] * (N - 12 % N) + [12 // N + 1] * (12 % N))
    assert make_loss().draw_steps(data["action"])[3] is None  # uniform: i.i.d. steps, no split


def test_bad_input():
    loss = make_loss()
    for key in ("observation", "action", ("next", "reward"), ("next", "observation")):
        data = make_batch()
        data[key][3] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            loss(data)
    data = make_batch()
    del data["next", "terminated"]
    with pytest.raises(KeyError, match="terminated"):
        loss.qvalue_loss(data)
    actor = DiffusionActor(EpsilonNetwork(ACT, OBS, hidden=32), make_schedule("vp", N))
    behavior = DiffusionActor(EpsilonNetwork(ACT, OBS, hidden=32), make_schedule("vp", N))
    with pytest.raises(ValueError, match="qvalue_network has observation_dim=4"):
        BDPOLoss(actor, behavior, make_value_operator(OBS, ACT), make_qvalue_operator(4, ACT), eta=0.1)
    with pytest.raises(ValueError, match="value_network has action_dim=3"):
        BDPOLoss(actor, behavior, make_value_operator(OBS, 3), make_qvalue_operator(OBS, ACT), eta=0.1)
    other = DiffusionActor(EpsilonNetwork(ACT, OBS, hidden=32), make_schedule("vp", 6))
    with pytest.raises(ValueError, match="different noise schedules"):
        BDPOLoss(actor, other, make_value_operator(OBS, ACT), make_qvalue_operator(OBS, ACT), eta=0.1)
    with pytest.raises(ValueError, match=r"value_network was built for num_steps=6 but the actor has 5 .*num_steps=5"):
        BDPOLoss(actor, behavior, make_value_operator(OBS, ACT, num_steps=6), make_qvalue_operator(OBS, ACT), eta=0.1)
    with pytest.raises(ValueError, match="expected an integer >= 1"):
        make_loss(num_qvalue_nets=2.5)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.int32, torch.float32])
def test_integer_and_float_terminated_give_the_bool_targets(dtype):
    """``~`` on an integer 0/1 flag flips its bits: the loss reads flags as bool."""
    loss = make_loss()
    term = torch.tensor([[True], [False], [True], [False], [False], [True], [False], [False]])
    data = make_batch(terminated=term)
    noise = torch.randn(N + 1, 8, M, ACT)
    want, want_kl, _ = loss.qvalue_target(data, noise=noise)
    cast = data.clone()
    cast["next", "terminated"] = term.to(dtype)
    cast["next", "done"] = term.to(dtype)
    got, got_kl, _ = loss.qvalue_target(cast, noise=noise)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_kl, want_kl)
    torch.testing.assert_close(got[term.squeeze(-1)], data["next", "reward"][term].reshape(-1))  # terminal: r
    torch.manual_seed(3)
    a = loss.qvalue_loss(data)[0]
    torch.manual_seed(3)
    b = loss.qvalue_loss(cast)[0]
    torch.testing.assert_close(a, b)
    bad = data.clone()
    bad["next", "terminated"] = torch.full((8, 1), 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"\('next', 'terminated'\).*holds \[2, 2, 2\]: a flag must be bool or 0/1"):
        loss.qvalue_target(bad)


def test_n_step_target_equals_torchrls_td0_on_a_multistep_batch():
    """A torchrl ``MultiStep`` batch: ``r + gamma^k (1 - terminated) v``, as ``TD0Estimator`` computes."""
    from torchrl.data.postprocs import MultiStep
    from torchrl.objectives.value import TD0Estimator

    T, gamma, n_steps = 12, 0.9, 3
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(1, T + 1, OBS, generator=g)
    term = torch.zeros(1, T, 1, dtype=torch.bool)
    term[0, -1] = True  # the last steps of the trajectory see fewer than n_steps rewards
    traj = TensorDict(
        {
            "observation": obs[:, :-1],
            "action": torch.rand(1, T, ACT, generator=g) * 2 - 1,
            "next": {
                "observation": obs[:, 1:],
                "reward": torch.randn(1, T, 1, generator=g),
                "terminated": term,
                "truncated": torch.zeros_like(term),
                "done": term.clone(),
            },
        },
        [1, T],
    )
    batch = MultiStep(gamma=gamma, n_steps=n_steps)(traj).reshape(-1)
    steps = batch["steps_to_next_obs"]
    assert set(steps.reshape(-1).tolist()) == {1, 2, 3}
    loss = make_loss(gamma=gamma)
    noise = torch.randn(N + 1, T, M, ACT)
    target, _, _ = loss.qvalue_target(batch, noise=noise)
    next_value, _, _ = loss.next_state_value(batch["next", "observation"], batch["next", "terminated"], noise=noise)
    reference = TD0Estimator(gamma=gamma, value_network=None).value_estimate(batch.clone(), next_value=next_value.unsqueeze(-1))
    torch.testing.assert_close(target, reference.squeeze(-1))
    live = ~batch["next", "terminated"].squeeze(-1)
    by_hand = batch["next", "reward"].squeeze(-1) + live * gamma ** steps.squeeze(-1).float() * next_value
    torch.testing.assert_close(target, by_hand)
    assert (steps < n_steps).any() and (gamma**steps != gamma).any()  # it would differ with gamma alone


def test_bad_batches_get_clear_errors():
    from torchrl_bdpo.objectives import DenoisingLoss, DiffusionValueLoss

    loss = make_loss()
    actor = DiffusionActor(EpsilonNetwork(ACT, OBS, hidden=8), make_schedule("vp", N))
    kl = PathwiseKLLoss(actor, DiffusionActor(EpsilonNetwork(ACT, OBS, hidden=8), make_schedule("vp", N)))
    den = DenoisingLoss(actor)
    value = DiffusionValueLoss(
        actor, actor, make_value_operator(OBS, ACT, hidden=8, num_steps=N), make_qvalue_operator(OBS, ACT, hidden=8), eta=0.2, num_qvalue_nets=2, num_samples=2
    )
    calls = [loss, loss.qvalue_loss, loss.value_loss, loss.actor_loss, loss.behavior_loss, kl, den, value]
    for call in calls:
        with pytest.raises(ValueError, match=r"empty batch \(batch size \(0,\)\)"):
            call(make_batch()[:0])
    for key, dtype in (("observation", torch.int64), ("action", torch.int64), ("observation", torch.float64)):
        data = make_batch()
        data[key] = data[key].to(dtype)
        for call in calls if key == "observation" else [loss, den, value]:
            dim = OBS if key == "observation" else ACT
            with pytest.raises(TypeError, match=rf"tensordict\['{key}'\] is {dtype} with shape \(8, {dim}\); expected torch.float32"):
                call(data)
    data = make_batch()
    data["next", "reward"] = data["next", "reward"].double()
    with pytest.raises(TypeError, match=r"\('next', 'reward'\)\] is torch.float64"):
        loss.qvalue_loss(data)
    for key in ("action", ("next", "reward")):
        data = make_batch()
        del data[key]
        with pytest.raises(KeyError, match=re.escape(f"no {key!r} entry") + ".*set_keys"):
            loss(data)


def test_init_actor_from_behavior_is_the_hand_over():
    from torchrl_bdpo.diffusion import make_reference

    loss = make_loss()
    with torch.no_grad():
        for p in loss.target_behavior_network_params.values(True, True):
            p.add_(0.5)
    loss.init_actor_from_behavior()
    for params in (loss.actor_network_params, loss.target_actor_network_params):
        assert (params == loss.target_behavior_network_params).all()
    data = make_batch()
    torch.manual_seed(0)
    same = loss.next_state_value(data["next", "observation"], data["next", "terminated"])[1]
    assert float(same.abs().max()) < 1e-10  # the actor is the KL reference: no path KL
    actor = DiffusionActor(EpsilonNetwork(ACT, OBS, hidden=32, depth=2), make_schedule("vp", N))
    ref = make_reference("uniform", make_schedule("vp", N), ACT, OBS)
    analytic = BDPOLoss(
        actor,
        ref,
        make_value_operator(OBS, ACT, hidden=32, num_steps=N),
        make_qvalue_operator(OBS, ACT, hidden=32),
        eta=0.2,
        num_qvalue_nets=K,
        num_samples=M,
        train_behavior=False,
    )
    with pytest.raises(ValueError, match=r"init_actor_from_behavior: the behavior network's parameters do not match.*fit_actor_to_reference"):
        analytic.init_actor_from_behavior()
    out = analytic(data)  # the analytic reference trains the rest as a behavior would
    assert torch.isfinite(out["loss_qvalue"]) and torch.isfinite(out["loss_actor"]) and "loss_behavior" not in out.keys()


def test_nested_reward_and_flag_keys():
    """``set_keys`` with nested keys (a multi-agent style layout) gives the flat layout's numbers."""
    loss = make_loss()
    data = make_batch()
    noise = torch.randn(N + 1, 8, M, ACT)
    want, _, _ = loss.qvalue_target(data, noise=noise)
    nested = data.clone()
    nested["next", "agent", "rew"] = nested["next", "reward"]
    nested["next", "agent", "term"] = nested["next", "terminated"]
    nested["next", "agent", "done"] = nested["next", "done"]
    del nested["next", "reward"], nested["next", "terminated"], nested["next", "done"]
    loss.set_keys(reward=("agent", "rew"), terminated=("agent", "term"), done=("agent", "done"))
    got, _, _ = loss.qvalue_target(nested, noise=noise)
    torch.testing.assert_close(got, want)
    assert torch.isfinite(loss(nested)["loss_qvalue"])
