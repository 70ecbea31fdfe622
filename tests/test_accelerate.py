"""compile / cudagraphs options: the same numbers as eager, and clear errors.

CPU tests run in CI (aot_eager: dynamo + AOTAutograd, no code generation). The
``gpu`` tests need CUDA (``pytest -m gpu``): CUDA graphs, and inductor on the GPU.
"""

import pytest
import torch
from tensordict import TensorDict

from tests.test_bdpo import ACT, M, N, OBS, make_batch, make_loss
from torchrl_bdpo.speed import AcceleratedFunction, SpeedOptions, accelerate, input_signature
from torchrl_bdpo.speed.rows import q_row_capacity
from torchrl_bdpo.training import BDPOUpdate

pytestmark = pytest.mark.filterwarnings("ignore")

LOSSES = ("qvalue_loss", "value_loss", "actor_loss", "behavior_loss")
# the networks each optimizer group clips apart
CLIPPED = {"critic": ("qvalue_network_params", "value_network_params"), "actor": ("actor_network_params",), "behavior": ("behavior_network_params",)}


def update_for(loss, fused=None, grad_clip=1.0, **kwargs):
    """A BDPOUpdate of ``loss`` with the tests' Adam (lr 1e-3) and target EMAs (tau 0.05)."""
    optimizers = {g: torch.optim.Adam(p, lr=1e-3, fused=fused) for g, p in BDPOUpdate.param_groups(loss).items()}
    updaters = dict(zip(("critic", "actor", "behavior"), loss.make_target_updaters(tau=0.05)))
    return BDPOUpdate(loss, optimizers, updaters, grad_clip=grad_clip, **kwargs)


def make_update(device="cpu", seed=0, fused=None, **kwargs):
    return update_for(make_loss(seed=seed).to(device), fused=fused, **kwargs)


def run_steps(update, batches, seed=0):
    """Alternate critic / policy / behavior steps with fixed seeds; return every output."""
    outs = []
    for i, batch in enumerate(batches):
        torch.manual_seed(seed + i)
        outs.append(update.critic(batch))
        outs.append(update.policy(batch))
        outs.append(update.behavior(batch))
    return outs


def assert_same_run(outs, ref_outs, update, ref_update, rtol=1e-4, atol=1e-5):
    assert len(outs) == len(ref_outs)
    for out, ref in zip(outs, ref_outs):
        assert set(out.keys()) == set(ref.keys())
        for key in ref.keys():
            torch.testing.assert_close(out[key], ref[key], rtol=rtol, atol=atol, equal_nan=True, msg=key)
    params = dict(update.loss.named_parameters())
    ref_params = dict(ref_update.loss.named_parameters())
    assert params.keys() == ref_params.keys()
    moved = 0
    for name, p in ref_params.items():
        torch.testing.assert_close(params[name], p, rtol=rtol, atol=atol, msg=name)
    # the steps did train: the online parameters moved away from a fresh loss's
    fresh = dict(make_loss(seed=0).named_parameters())
    for name, p in ref_params.items():
        moved += not torch.allclose(p.detach().cpu(), fresh[name].detach())
    assert moved > 0


def cpu_batches(n=2, B=8):
    term = torch.tensor([[True], [False], [False], [False]] * (B // 4))
    return [make_batch(B=B, terminated=term, seed=10 + i) for i in range(n)]


# --------------------------------------------------------------------------- CPU
def test_input_signature_tells_batch_shapes_and_keys_apart():
    a = TensorDict({"x": torch.zeros(4, 3)}, [4])
    assert input_signature((a,)) == input_signature((a.clone(),))
    assert input_signature((a,)) != input_signature((a[:2],))
    assert input_signature((a,)) != input_signature((a.clone().set("y", torch.zeros(4)),))
    assert input_signature((torch.zeros(2),)) != input_signature((torch.zeros(2, dtype=torch.float64),))
    with pytest.raises(TypeError, match="neither a tensor"):
        input_signature((bytearray(b"x"),))


def test_loss_to_moves_the_schedules():
    """TorchRL keeps networks outside the loss's module tree; their schedules must still follow .to()."""
    from torchrl_bdpo.diffusion import DiffusionActor, EpsilonNetwork, make_schedule
    from torchrl_bdpo.objectives import DenoisingLoss, PathwiseKLLoss

    def model():
        return DiffusionActor(EpsilonNetwork(ACT, OBS, hidden=8, depth=1), make_schedule("vp", N))

    losses = [make_loss(), DenoisingLoss(model()), PathwiseKLLoss(model(), model())]
    for loss in losses:
        loss.to(torch.float16)  # a dtype stands in for a device here: the same _apply path
        models = [v for v in vars(loss).values() if isinstance(v, DiffusionActor)]
        assert models
        for m in models:
            floats = [b for b in m.schedule.buffers() if b.is_floating_point()]
            assert floats and {b.dtype for b in floats} == {torch.float16}, type(loss).__name__


def test_accelerate_off_returns_the_function():
    def f(x):
        return x + 1

    assert accelerate(f) is f
    wrapped = accelerate(f, compile=True, backend="eager")
    assert isinstance(wrapped, AcceleratedFunction) and wrapped.__name__ == "f"
    # a misspelt option is an error whether acceleration is on or off, never ignored
    for on in ({}, {"compile": True}):
        with pytest.raises(TypeError, match="compiled"):
            accelerate(f, compiled=True, **on)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cudagraphs_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="cudagraphs=True needs a CUDA device.*Set cudagraphs=False"):
        accelerate(lambda x: x, cudagraphs=True)
    with pytest.raises(RuntimeError, match="critic step: cudagraphs=True needs a CUDA device"):
        make_update(cudagraphs=True)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        make_loss().make_acting_module(num_candidates=4, cudagraphs=True)


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="warmup=0"):
        accelerate(lambda x: x, compile=True, warmup=0)
    loss = make_loss()
    opts = {g: torch.optim.Adam(p) for g, p in BDPOUpdate.param_groups(loss).items()}
    with pytest.raises(KeyError, match=r"updaters lacks \['behavior'\]"):
        BDPOUpdate(loss, opts, dict(zip(("critic", "actor"), loss.make_target_updaters())))
    with pytest.raises(ValueError, match="grad_clip=0"):
        BDPOUpdate(loss, opts, dict(zip(("critic", "actor", "behavior"), loss.make_target_updaters())), grad_clip=0)


def test_loss_methods_trace_without_graph_breaks():
    """fullgraph=True fails on any host sync or data-dependent shape: what CUDA-graph capture forbids."""
    loss = make_loss()
    data = make_batch(terminated=torch.tensor([[True], [False]] * 4))
    for m in LOSSES:
        getattr(loss, m)(data)  # eager first (lazy state)
        torch.compile(getattr(loss, m), fullgraph=True, backend="eager")(data)
    acting = loss.make_acting_module(num_candidates=3)
    acting.select(data["observation"])
    torch.compile(acting.select, fullgraph=True, backend="eager")(data["observation"])


def test_eager_update_matches_the_hand_written_steps():
    """BDPOUpdate's steps are the script's: losses, backward, clip, Adam, target EMA."""
    batches = cpu_batches()
    update = make_update()
    outs = run_steps(update, batches)
    # by hand, on an identical loss
    loss = make_loss(seed=0)
    groups = BDPOUpdate.param_groups(loss)
    opts = {g: torch.optim.Adam(p, lr=1e-3) for g, p in groups.items()}
    upd = dict(zip(("critic", "actor", "behavior"), loss.make_target_updaters(tau=0.05)))
    for i, batch in enumerate(batches):
        torch.manual_seed(i)
        for group, methods in (("critic", ("qvalue_loss", "value_loss")), ("actor", ("actor_loss", "behavior_loss")), ("behavior", ("behavior_loss",))):
            for o in opts.values():
                o.zero_grad(set_to_none=True)
            total = sum(getattr(loss, m)(batch)[0] for m in methods)
            total.backward()
            applied = (group, "behavior") if group == "actor" else (group,)
            for g in applied:
                # each network apart, as the authors' code clips its q0 and vt models
                for attr in CLIPPED[g]:
                    torch.nn.utils.clip_grad_norm_(list(getattr(loss, attr).parameters()), 1.0)
                opts[g].step()
                upd[g].step()
    for name, p in loss.named_parameters():
        torch.testing.assert_close(dict(update.loss.named_parameters())[name], p, msg=name)
    assert torch.isfinite(outs[-1]["loss_behavior"])


def _grad_norm(params) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))


def test_critic_step_clips_q_and_v_apart():
    """Q and V each to its own global norm (the authors' q0 and vt models), never one norm over both:
    with a clip that binds, each network's clipped gradient has the clip's norm, and the reported
    norms are the unclipped ones of a hand-made backward with the same draws."""
    clip = 1e-3
    batch = cpu_batches(1)[0]
    update = update_for(make_loss(seed=0), grad_clip=clip)
    loss = make_loss(seed=0)  # by hand: the same losses and draws, no step
    torch.manual_seed(5)
    (loss.qvalue_loss(batch)[0] + loss.value_loss(batch)[0]).backward()
    raw = {name: _grad_norm(getattr(loss, name + "_network_params").parameters()) for name in ("qvalue", "value")}
    assert min(raw.values()) > 10 * clip  # the clip binds on both
    torch.manual_seed(5)
    out = update.critic(batch)
    assert "grad_norm_critic" not in out.keys()
    for name in ("qvalue", "value"):
        torch.testing.assert_close(out[f"grad_norm_{name}"], raw[name], rtol=1e-5, atol=0, msg=name)
        clipped = _grad_norm(getattr(update.loss, name + "_network_params").parameters())
        torch.testing.assert_close(clipped, torch.tensor(clip), rtol=1e-4, atol=0, msg=name)
    # one norm over both would leave the two clipped norms' root sum of squares at the clip, not sqrt(2) x it
    both = torch.linalg.vector_norm(torch.stack([_grad_norm(getattr(update.loss, n + "_network_params").parameters()) for n in ("qvalue", "value")]))
    torch.testing.assert_close(both, torch.tensor(clip * 2**0.5), rtol=1e-4, atol=0)


class _KnownReward(torch.nn.Module):
    """A parameter-free Q: a known reward of the action (DiffusionValueLoss's fine-tuning use)."""

    def forward(self, observation, action):
        return -action.pow(2).sum(-1, keepdim=True)


def known_reward_loss(seed=0):
    from tensordict.nn import TensorDictModule

    reward = TensorDictModule(_KnownReward(), in_keys=["observation", "action"], out_keys=["state_action_value"])
    return make_loss(seed=seed, qvalue_network=reward, rho=0.0, num_qvalue_nets=2)


@pytest.mark.parametrize("compile", [False, True])
def test_update_with_a_known_reward_as_q_trains_the_value_only(compile):
    """A parameter-free Q has no parameters to train: the critic group is V's alone, and the
    steps run (eager and compiled) and give the same numbers."""
    loss = known_reward_loss()
    groups = BDPOUpdate.param_groups(loss)
    assert [id(p) for p in groups["critic"]] == [id(p) for p in loss.value_network_params.parameters()]
    assert len(groups["actor"]) == len(list(loss.actor_network_params.parameters())) > 0
    batches = cpu_batches()
    ref = update_for(known_reward_loss())
    ref_outs = run_steps(ref, batches)
    upd = update_for(loss, compile=compile, compile_backend="aot_eager") if compile else update_for(loss)
    outs = run_steps(upd, batches)
    fresh = known_reward_loss()
    for out, r in zip(outs, ref_outs):
        for key in r.keys():
            torch.testing.assert_close(out[key], r[key], rtol=1e-4, atol=1e-5, equal_nan=True, msg=key)
    # the Q loss is that of the known reward against the KL-penalised target
    assert outs[0]["loss_qvalue"] > 0
    for name in ("value_network_params", "actor_network_params"):
        moved = [not torch.allclose(p, q) for p, q in zip(getattr(upd.loss, name).parameters(), getattr(fresh, name).parameters())]
        assert any(moved), name


@pytest.mark.parametrize("fuse_narrow", [False, True])
def test_compiled_update_matches_eager(fuse_narrow):
    """Compiled losses inside full optimizer steps: same outputs and parameters, step for step.
    ``fuse_narrow=True``: with the networks' narrow maps written as sums, as on a GPU."""
    from torchrl_bdpo.diffusion import networks
    from torchrl_bdpo.speed import kernels

    batches = cpu_batches()
    ref = make_update()
    ref_outs = run_steps(ref, batches)
    loss = networks.set_fuse_narrow_linear(make_loss(seed=0), fuse_narrow)
    assert len(fusing := kernels._fusing_modules(loss)) == 4 + 2 * 3 + 2 * 4  # the networks and their Linear layers
    assert {m.fuse_narrow for m in fusing} == {fuse_narrow}
    upd = update_for(loss, compile=True, compile_backend="aot_eager")
    outs = run_steps(upd, batches)
    assert_same_run(outs, ref_outs, upd, ref)


def test_compiled_update_with_stratified_steps_matches_eager():
    """Stratified steps: the compiled step evaluates each ensemble on its index set of rows, as eager does."""
    batches = cpu_batches(B=12)
    ref = update_for(make_loss(step_sampling="stratified"))
    ref_outs = run_steps(ref, batches)
    upd = update_for(make_loss(step_sampling="stratified"), compile=True, compile_backend="aot_eager")
    outs = run_steps(upd, batches)
    assert_same_run(outs, ref_outs, upd, ref)


def test_compiled_update_with_adaptive_q_target_pessimism_matches_eager():
    """``qvalue_target_pessimism``: the compiled step (every next state's path, masked) finds the
    weight eager finds on the live rows alone, and logs it."""
    batches = cpu_batches(B=12)
    ref = update_for(make_loss(qvalue_target_pessimism=0.5))
    ref_outs = run_steps(ref, batches)
    assert all(torch.isfinite(out["qvalue_target_rho"]) and out["qvalue_target_rho"] > 0 for out in ref_outs[::3])
    upd = update_for(make_loss(qvalue_target_pessimism=0.5), compile=True, compile_backend="aot_eager")
    outs = run_steps(upd, batches)
    assert_same_run(outs, ref_outs, upd, ref)


def test_compiled_update_matches_eager_past_the_q_row_capacity():
    """At 64 rows a compiled CPU step evaluates V_0 = Q on 36 selected rows, not all 64 x M."""
    batches = cpu_batches(B=64)
    ref = make_update()
    assert q_row_capacity(64, N) == 36
    ref_outs = run_steps(ref, batches)
    upd = make_update(compile=True, compile_backend="aot_eager")
    outs = run_steps(upd, batches)
    assert_same_run(outs, ref_outs, upd, ref)


def test_compiled_update_with_ensemble_chunks_matches_eager(chunk_calls):
    """Chunked target ensembles under compile: chunk graphs outside the step's, eager's numbers.

    The reference evaluates each ensemble in one call, eagerly. Then a second compiled update,
    of other sizes and without chunks, runs in the same process: the graphs of the first must
    not leak into it (BDPOUpdate compiles with static shapes).
    """
    batches = cpu_batches(B=16)
    ref = make_update()
    ref.loss.speed = SpeedOptions(ensemble_chunk_rows=None)
    ref_outs = run_steps(ref, batches)
    assert chunk_calls == []
    loss = make_loss(seed=0, speed=SpeedOptions(ensemble_chunk_rows=4 * M, ensemble_chunk_compile={"backend": "aot_eager"}))
    upd = update_for(loss, compile=True, compile_backend="aot_eager")  # 4 states x M samples a chunk
    outs = run_steps(upd, batches)
    assert_same_run(outs, ref_outs, upd, ref)
    # compiled steps (all but each method's first, eager call) split the Q target, V's and the actor's
    calls = [options for _, options in chunk_calls]
    assert calls.count({"backend": "aot_eager"}) >= 3 and set(map(str, calls)) <= {"None", "{'backend': 'aot_eager'}"}
    other = make_loss(seed=1, num_qvalue_nets=2, speed=SpeedOptions(ensemble_chunk_rows=None))
    upd2 = update_for(other, grad_clip=None, compile=True, compile_backend="aot_eager")
    for out in run_steps(upd2, cpu_batches(B=16)):
        assert all(torch.isfinite(v).all() for k, v in out.items() if k not in ("path_kl", "kl_per_step")), out


def run_behavior_steps(update, batches, seed=0):
    outs = []
    for i, batch in enumerate(batches):
        torch.manual_seed(seed + i)
        outs.append(update.behavior(batch))
    return outs


@pytest.mark.parametrize("reduction,grad_clip", [("mean", 1.0), ("sum", 1e-3), ("mean", None)])
def test_compiled_cpu_behavior_step_is_one_functional_program(monkeypatch, reduction, grad_clip):
    """Compiled CPU pretraining steps run loss, gradients and clip as one program: eager's numbers.

    grad_clip=1e-3 with a summed loss makes the clip act on every step.
    """
    batches = cpu_batches(n=3, B=16)

    ref = update_for(make_loss(seed=0, reduction=reduction), grad_clip=grad_clip)
    assert ref._behavior_program is None  # eager steps: the regular path
    ref_outs = run_behavior_steps(ref, batches)
    upd = update_for(make_loss(seed=0, reduction=reduction), grad_clip=grad_clip, compile=True, compile_backend="aot_eager")
    program = upd._behavior_program
    assert program is not None
    calls = []
    monkeypatch.setattr(program, "fn", lambda *a, fn=program.fn: calls.append(1) or fn(*a))
    monkeypatch.setattr(upd, "_fns", {**upd._fns, "behavior_loss": None})  # the regular path would fail
    outs = run_behavior_steps(upd, batches)
    assert len(calls) == len(batches)
    assert_same_run(outs, ref_outs, upd, ref)
    assert ("grad_norm_behavior" in outs[0].keys()) == (grad_clip is not None)
    if grad_clip == 1e-3:
        assert all(o["grad_norm_behavior"] > 1e-3 for o in outs)  # the clip did act
    # the gradients the optimizer stepped on (clipped): Adam's update hardly depends on their scale
    for p, q in zip(upd._params["behavior"], ref._params["behavior"]):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7)
    # the target EMA followed, as eager's
    for (name, p), (_, q) in zip(upd.loss.target_behavior_network_params.items(True, True), ref.loss.target_behavior_network_params.items(True, True)):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=str(name))


def test_behavior_program_leaves_masked_batches_and_overridden_losses_to_the_regular_step():
    upd = make_update(compile=True, compile_backend="aot_eager")
    program = upd._behavior_program
    batch = make_batch(B=8)
    assert program.accepts(batch)
    masked = batch.clone()
    masked["collector", "mask"] = torch.tensor([True] * 6 + [False] * 2)
    assert not program.accepts(masked)
    ref = make_update()
    torch.manual_seed(0)
    ref_out = ref.behavior(masked)
    torch.manual_seed(0)
    out = upd.behavior(masked)  # the compiled loss method, which reads the mask
    torch.testing.assert_close(out["loss_behavior"], ref_out["loss_behavior"], rtol=1e-4, atol=1e-5)

    class OwnBehaviorLoss(type(upd.loss)):
        def behavior_loss(self, tensordict):
            loss, meta = super().behavior_loss(tensordict)
            return 2 * loss, meta

    own = make_loss()
    own.__class__ = OwnBehaviorLoss
    assert update_for(own, compile=True, compile_backend="aot_eager")._behavior_program is None
    # and a loss whose speed options turn the program off
    off = make_loss(speed=SpeedOptions(behavior_program=False))
    assert update_for(off, compile=True, compile_backend="aot_eager")._behavior_program is None


def test_update_never_changes_the_losses_speed_options(chunk_calls):
    """The speed options are the loss's own (a constructor argument), never the update's: without
    chunk compile options a compiled step evaluates each ensemble in one call; a bad value is named."""
    for given in (None, {"mode": "max-autotune-no-cudagraphs"}):
        speed = SpeedOptions(ensemble_chunk_compile=given)
        loss = make_loss(speed=speed)
        update_for(loss, grad_clip=None, compile=True, compile_backend="aot_eager")
        assert loss.speed is speed and loss.speed.ensemble_chunk_compile == given
    upd = update_for(make_loss(speed=SpeedOptions(ensemble_chunk_rows=4 * M)), compile=True, compile_backend="aot_eager")
    run_steps(upd, cpu_batches(B=16))
    assert chunk_calls and all(options is None for _, options in chunk_calls)  # eager first calls only
    with pytest.raises(TypeError, match=r"ensemble_chunk_compile='aot_eager': expected None or a dict"):
        SpeedOptions(ensemble_chunk_compile="aot_eager")


@pytest.mark.parametrize("zeros", ["some", "all", "small batch", "per sample", "option off"])
def test_compiled_next_value_takes_q_on_capacity_rows_or_all(zeros):
    """``_next_value`` compiled on a CPU: Q on the capacity's rows while the ``n - 1 = 0`` rows fit,
    on every row when they do not (or when the batch is no larger than the capacity, or with
    ``SpeedOptions(q_target_rows=False)``); eager's values."""
    loss = make_loss(speed=SpeedOptions(q_target_rows=zeros != "option off"))
    B = 8 if zeros == "small batch" else 64
    g = torch.Generator().manual_seed(3)
    obs = torch.randn(B, M, OBS, generator=g)
    act = torch.rand(B, M, ACT, generator=g) * 2 - 1
    step = torch.randint(0, N, (B, 1), generator=g)
    if zeros == "all":
        step = torch.zeros(B, 1, dtype=torch.long)
    step = step.expand(B, M)
    if zeros == "per sample":  # steps that differ within a row: Q where n - 1 = 0, per sample
        step = torch.randint(0, N, (B, M), generator=g)
        step[:, 1:] = step[:, 1:].clamp(min=1)  # zeros only in the first sample: the rows fit
    q_rows = []
    qvalue = loss._qvalue

    def spy(params, observation, action):
        q_rows.append(observation.shape[:-1].numel())
        return qvalue(params, observation, action)

    loss._qvalue = spy
    with torch.no_grad():
        ref = loss._next_value(obs, act, step)  # eager: Q on the n - 1 = 0 rows only
        assert q_rows == [int((step == 0).sum())]
        q_rows.clear()
        torch._dynamo.reset()
        out = torch.compile(loss._next_value, backend="aot_eager")(obs, act, step)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    capacity = q_row_capacity(B, N)
    expected = {"some": capacity, "all": B, "small batch": B, "per sample": capacity, "option off": B}[zeros] * M
    assert capacity == (36 if B == 64 else B)
    assert set(q_rows) == {expected}, q_rows


def record_all_terminal(update):
    """Record the ``all_terminal`` flag of each of ``update``'s Q-loss calls."""
    inner, flags = update._fns["qvalue_loss"], []

    def record(batch, **kwargs):
        flags.append(kwargs.get("all_terminal"))
        return inner(batch, **kwargs)

    update._fns["qvalue_loss"] = record
    return flags


def test_compiled_update_skips_the_paths_of_all_terminal_batches():
    """A compiled CPU critic step looks at the batch outside the graph: all-terminal batches
    (bandits) take a graph without Q-target paths, mixed ones the static graph; both match eager."""
    term_all = torch.ones(8, 1, dtype=torch.bool)
    batches = [make_batch(terminated=term_all, seed=20), cpu_batches(1)[0], make_batch(terminated=term_all, seed=21)]
    ref = make_update()
    ref_flags = record_all_terminal(ref)
    ref_outs = run_steps(ref, batches)
    upd = make_update(compile=True, compile_backend="aot_eager")
    flags = record_all_terminal(upd)
    outs = run_steps(upd, batches)
    assert flags == [True, None, True]  # passed only when set
    assert ref_flags == [None, None, None]  # eager skips terminal rows by itself
    assert_same_run(outs, ref_outs, upd, ref)
    assert torch.isnan(outs[0]["path_kl"]) and torch.isfinite(outs[3]["path_kl"])


@pytest.mark.parametrize("fuse_narrow", [False, True])
def test_compiled_acting_and_q_target_match_eager(fuse_narrow):
    from torchrl_bdpo.diffusion import networks
    from torchrl_bdpo.speed import kernels

    loss = networks.set_fuse_narrow_linear(make_loss(), fuse_narrow)
    assert {m.fuse_narrow for m in kernels._fusing_modules(loss)} == {fuse_narrow}
    eager = loss.make_acting_module(num_candidates=4)
    compiled = loss.make_acting_module(num_candidates=4, compile=True, compile_backend="aot_eager")
    for B in (1, 5, 1):
        td = TensorDict({"observation": torch.randn(B, OBS)}, [B])
        torch.manual_seed(B)
        ref = eager(td.clone())["action"]
        torch.manual_seed(B)
        out = compiled(td.clone())["action"]
        torch.testing.assert_close(out, ref)
        assert out.shape == (B, ACT)
    # the Q-target paths (next-state value with its path KL), fixed noise, terminal rows
    B = 6
    obs, term = torch.randn(B, OBS), torch.tensor([True, False, False, True, False, False]).unsqueeze(-1)
    noise = torch.randn(N + 1, B, M, ACT)
    fn = accelerate(loss.next_state_value, compile=True, backend="aot_eager")
    ref = loss.next_state_value(obs, term, noise=noise)
    fn(obs, term, noise=noise)  # first call: eager
    out = fn(obs, term, noise=noise)  # compiled: static path over every row, masked
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (out[0][term.squeeze(-1)] == 0).all()


def test_compiled_acting_specialises_each_batch_size(monkeypatch):
    """Compiled acting asks torch.compile for static graphs, one per batch size (``dynamic=False``),
    never a graph over a symbolic batch size: torch 2.11's dynamo fails on the ensemble's vmap
    there (a ``TorchRuntimeError`` at the second batch size, seen on an H200). torch 2.13 here
    specialises either way, so the option itself is what is checked."""
    from torchrl_bdpo.speed import compile as compile_mod

    calls = []

    def recording_compile(fn, **kwargs):
        calls.append((getattr(fn, "__name__", ""), kwargs))
        return fn

    monkeypatch.setattr(compile_mod.torch, "compile", recording_compile)
    acting = make_loss().make_acting_module(num_candidates=4, compile=True, compile_mode="default")
    assert sorted(name for name, _ in calls) == ["sample", "select"]
    assert all(kw == {"mode": "default", "dynamic": False} for _, kw in calls), calls
    for B in (1, 1, 3):  # the recorded "compile" returned the functions themselves: still acting
        assert acting(TensorDict({"observation": torch.randn(B, OBS)}, [B]))["action"].shape == (B, ACT)


class _RecordingStream:
    """A stand-in for a CUDA stream (CPU tests): records forks, joins and what ran inside it."""

    device = torch.device("cpu")

    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")


def test_overlapped_steps_fork_and_join_around_the_second_loss(monkeypatch):
    """The host logic of overlap_losses, on a CPU with a recording stand-in for the streams:
    the side stream forks before the first loss and joins before anything after the second,
    and the numbers are those of the one-stream step."""
    import contextlib

    log = []
    main, side = _RecordingStream(log, "main"), _RecordingStream(log, "side")
    current = [main]

    @contextlib.contextmanager
    def on(stream):
        current.append(stream)
        log.append(f"enter {stream.name}")
        yield
        current.pop()
        log.append(f"exit {stream.name}")

    monkeypatch.setattr(BDPOUpdate, "_make_side_stream", staticmethod(lambda loss: side))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", on)
    upd, ref = make_update("cpu", overlap_losses=True), make_update("cpu")
    for name in LOSSES:  # which stream each loss runs on
        fn = upd._fns[name]
        upd._fns[name] = lambda *a, _fn=fn, _name=name, **k: (log.append(f"{_name} on {current[-1].name}"), _fn(*a, **k))[1]
    batches = cpu_batches(2)
    outs, ref_outs = run_steps(upd, batches), run_steps(ref, batches)
    assert_same_run(outs, ref_outs, upd, ref, rtol=0, atol=0)
    critic = [
        "side waits main",
        "qvalue_loss on main",
        "enter side",
        "value_loss on side",
        "exit side",
        "main waits side",
        "main waits side",  # after the backward pass
        "side waits main",
        "enter side",
        "exit side",
        "main waits side",
    ]  # Q's and V's gradient clips
    policy = [
        "side waits main",
        "actor_loss on main",
        "enter side",
        "behavior_loss on side",
        "exit side",
        "main waits side",
        "main waits side",
        "side waits main",
        "enter side",
        "exit side",
        "main waits side",
    ]  # backward, optimizer steps
    behavior = ["behavior_loss on main"]
    assert log == (critic + policy + behavior) * 2


def test_overlap_losses_off_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match=r"overlap_losses=True .* on \['cpu'\]: move the loss"):
        make_update("cpu", overlap_losses=True)


# --------------------------------------------------------------------------- GPU
# `-m gpu` runs them all (~6+ minutes on a cold H200: each compiled variant is a cold inductor
# compile of its own); benchmarks/gpu_check.sh runs `-m "gpu and not slow"`, which keeps one
# compiled test (compile + CUDA graphs + two streams, what the scripts run on CUDA) and leaves the
# other compiled variants, marked slow as well, to a full run.
def gpu_batches(n=3, B=16):
    return [b.to("cuda") for b in cpu_batches(n, B)]


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [None, True])  # foreach Adam (CUDA's default) and the fused kernel the scripts use
def test_cudagraph_update_matches_eager_and_recaptures_new_batch_sizes(fused):
    ref = make_update("cuda", fused=fused)
    upd = make_update("cuda", fused=fused, cudagraphs=True, warmup=2)
    batches = gpu_batches(4) + [b.to("cuda") for b in cpu_batches(2, B=8)] + gpu_batches(2)
    ref_outs = run_steps(ref, batches)
    outs = run_steps(upd, batches)  # warm-up, capture, replays, a second batch size, back to the first
    assert upd.critic.num_graphs == 2 and upd.policy.num_graphs == 2
    # GEMMs of other shapes (all next states vs the non-terminal ones) round differently
    assert_same_run(outs, ref_outs, upd, ref, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
def test_cudagraph_q_target_with_terminal_rows_matches_eager():
    loss = make_loss().to("cuda")
    B = 8
    obs = torch.randn(B, OBS, device="cuda")
    term = (torch.arange(B, device="cuda") % 3 == 0).unsqueeze(-1)
    noise = torch.randn(N + 1, B, M, ACT, device="cuda")
    ref = loss.next_state_value(obs, term, noise=noise)
    fn = accelerate(loss.next_state_value, cudagraphs=True, warmup=1)
    for _ in range(3):
        out = fn(obs, term, noise=noise)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_cudagraph_acting_matches_eager(compile):
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    loss = make_loss().to("cuda")
    eager = loss.make_acting_module(num_candidates=10)
    graphed = loss.make_acting_module(num_candidates=10, cudagraphs=True, compile=compile)
    for i, B in enumerate((1, 256, 1, 1, 256, 1)):
        td = TensorDict({"observation": torch.randn(B, OBS, device="cuda")}, [B])
        torch.manual_seed(i)
        ref = eager(td.clone())["action"]
        torch.manual_seed(i)
        out = graphed(td.clone())["action"]
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert graphed._select.num_graphs == 2


@pytest.mark.gpu
@pytest.mark.slow  # a cold inductor compile each; the two-stream test below covers compile + graphs in gpu_check.sh
@pytest.mark.parametrize("fuse_narrow", [False, "cuda"])  # GEMMs (the default) and the experimental sums
def test_compiled_cudagraph_update_matches_eager(fuse_narrow):
    """inductor (random ops left to eager's RNG) inside CUDA graphs."""
    import torch._inductor.config as inductor_config
    from torchrl_bdpo.diffusion import networks

    inductor_config.fallback_random = True
    batches = gpu_batches(4)
    ref = make_update("cuda")
    upd = update_for(networks.set_fuse_narrow_linear(make_loss(seed=0), fuse_narrow).to("cuda"), compile=True, cudagraphs=True)
    assert_same_run(run_steps(upd, batches), run_steps(ref, batches), upd, ref, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("compile,cudagraphs,train_behavior", [(False, False, True), (False, True, True), (False, True, False), (True, True, True)])
def test_overlapped_losses_match_the_one_stream_step(compile, cudagraphs, train_behavior):
    """Two streams: the same operations in the same host order, so the same draws and numbers."""
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    batches = gpu_batches(4)
    kw = dict(compile=compile, cudagraphs=cudagraphs)
    ref, upd = make_update("cuda", fused=True, **kw), make_update("cuda", fused=True, overlap_losses=True, **kw)
    for u in (ref, upd):
        u.loss.train_behavior = train_behavior
    assert upd._side_stream is not None and ref._side_stream is None
    outs, ref_outs = run_steps(upd, batches), run_steps(ref, batches)
    assert ("loss_behavior" in outs[1].keys()) == train_behavior
    assert_same_run(outs, ref_outs, upd, ref, rtol=1e-5, atol=1e-6)
    if cudagraphs:
        assert upd.critic.num_graphs == 1 and upd.policy.num_graphs == 1


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_cudagraph_update_with_stratified_steps_matches_eager(compile):
    """Stratified steps under CUDA graphs (two streams): Q and V each on their own rows, no host
    read; eager's numbers, across a recapture for another batch size."""
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    batches = gpu_batches(3, B=12) + [b.to("cuda") for b in cpu_batches(1, B=8)]
    ref = update_for(make_loss(step_sampling="stratified").to("cuda"), fused=True)
    upd = update_for(make_loss(step_sampling="stratified").to("cuda"), fused=True, compile=compile, cudagraphs=True, overlap_losses=True)
    assert_same_run(run_steps(upd, batches), run_steps(ref, batches), upd, ref, rtol=1e-3, atol=1e-4)
    assert upd.critic.num_graphs == 2


@pytest.mark.gpu
def test_cudagraph_on_cpu_inputs_is_a_clear_error():
    upd = make_update("cuda", cudagraphs=True)
    with pytest.raises(RuntimeError, match="inputs live on"):
        upd.critic(cpu_batches(1)[0])


@pytest.mark.gpu
def test_every_loss_runs_on_cuda():
    """The schedules follow loss.to("cuda") (TorchRL keeps networks out of the module tree)."""
    from torchrl_bdpo.diffusion import DiffusionActor, EpsilonNetwork, make_schedule
    from torchrl_bdpo.objectives import DenoisingLoss, PathwiseKLLoss

    def model():
        return DiffusionActor(EpsilonNetwork(ACT, OBS, hidden=8, depth=1), make_schedule("vp", N))

    batch = cpu_batches(1)[0].to("cuda")
    out = make_loss().to("cuda")(batch)
    assert all(v.device.type == "cuda" for v in out.values())
    assert DenoisingLoss(model()).to("cuda")(batch)["loss_denoising"].device.type == "cuda"
    kl = PathwiseKLLoss(model(), model()).to("cuda")(batch)
    assert kl["loss_kl"].device.type == "cuda" and torch.isfinite(kl["loss_kl"])
