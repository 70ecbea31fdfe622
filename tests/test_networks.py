import math

import pytest
import torch
from torch import nn

from torchrl_bdpo.diffusion import DiffusionValueNetwork, EpsilonNetwork, QValueNetwork, SinusoidalTimestepEmbedding
from torchrl_bdpo.diffusion.networks import _lookup_rows


def test_sinusoidal_embedding_values():
    emb = SinusoidalTimestepEmbedding(64)
    out = emb(torch.tensor([0, 3]))
    assert out.shape == (2, 64)
    torch.testing.assert_close(out[0, :32], torch.zeros(32))
    torch.testing.assert_close(out[0, 32:], torch.ones(32))
    # first frequency is 1, last is 1e-4: raw integer steps, not rescaled
    assert out[1, 0] == pytest.approx(math.sin(3.0), abs=1e-6)
    assert out[1, 31] == pytest.approx(math.sin(3e-4), abs=1e-6)


def test_epsilon_network_architecture_and_init():
    net = EpsilonNetwork(3, 5)
    linears = [m for m in net.body if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears] == [256, 256, 256, 256, 3]
    assert linears[0].in_features == 3 + 64 + 5
    assert sum(isinstance(m, nn.Mish) for m in net.body) == 4
    w = linears[1].weight
    torch.testing.assert_close(w @ w.T, 2 * torch.eye(256), atol=1e-4, rtol=0)
    assert all((lin.bias == 0).all() for lin in linears)


@pytest.mark.parametrize("batch", [(), (4,), (2, 3)])
def test_network_batch_shapes(batch):
    net = EpsilonNetwork(2, 3, hidden=16)
    a, s = torch.randn(*batch, 2), torch.randn(*batch, 3)
    assert net(a, 2, s).shape == (*batch, 2)
    n = torch.randint(1, 6, batch)
    assert net(a, n, s).shape == (*batch, 2)
    v = DiffusionValueNetwork(3, 2, hidden=16)
    assert v(s, a, n).shape == (*batch, 1)
    assert any(isinstance(m, nn.LayerNorm) for m in v.body)
    q = QValueNetwork(3, 2, hidden=16)
    assert q(s, a).shape == (*batch, 1)


def test_network_bad_dims():
    net = EpsilonNetwork(2, 3, hidden=16)
    with pytest.raises(ValueError, match=r"action has shape \(4, 5\): expected a last dimension of 2"):
        net(torch.randn(4, 5), 1, torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"observation has shape \(4, 7\).*observation_dim"):
        net(torch.randn(4, 2), 1, torch.randn(4, 7))
    with pytest.raises(ValueError, match="observation is None"):
        net(torch.randn(4, 2), 1, None)
    with pytest.raises(ValueError, match="action_dim=0"):
        EpsilonNetwork(0, 3)


def test_mish_one_exp_matches_aten_mish():
    """The compiled-path formulation equals ATen's mish, values and gradients, tails included."""
    from torchrl_bdpo.speed.kernels import mish_one_exp

    x = torch.cat([torch.linspace(-100, 100, 4001), torch.tensor([-1e4, 19.99, 20.0, 20.01, 1e4])])
    x = x.double().requires_grad_()
    ref = nn.functional.mish(x)
    out = mish_one_exp(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    (g_out,) = torch.autograd.grad(out.sum(), x)
    # the clamp cuts the (already < 1e-7) derivative of tanh(softplus) above x = 20
    torch.testing.assert_close(g_out, g_ref, rtol=0, atol=1e-6)
    x32 = torch.randn(10_000) * 8
    torch.testing.assert_close(mish_one_exp(x32), nn.functional.mish(x32), rtol=1e-6, atol=1e-6)
    assert torch.isinf(mish_one_exp(torch.tensor([float("inf")]))).all()


def test_mish_module_compiled_equals_eager():
    from torchrl_bdpo.speed.kernels import Mish

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    x = torch.randn(64, 32) * 5
    eager = Mish()(x)
    compiled = torch.compile(Mish(), backend=recording_backend, fullgraph=True)(x)
    assert "exp" in graphs[0] and "mish" not in graphs[0]  # the one-exp form was traced
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eager, nn.functional.mish(x), rtol=1e-6, atol=1e-6)


def _traced_graphs(fn, *args):
    """``fn(*args)`` compiled with a backend that records dynamo's graphs and runs them as traced."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=recording_backend, fullgraph=True)(*args)
    return out, "\n".join(graphs)


@pytest.mark.parametrize("in_f,out_f,fused", [(6, 32, True), (8, 8, True), (32, 6, True), (32, 1, True), (9, 32, False), (32, 9, False)])
def test_narrow_linear_is_a_sum_under_compile_with_linear_values_and_gradients(in_f, out_f, fused):
    """Few inputs (an action part) or few outputs (an eps or critic head): under compile a
    multiply-and-sum, not a GEMM; the values and gradients are F.linear's, member by member under
    vmap too (the critic ensembles). Wider maps stay a GEMM."""
    import functools

    from torchrl_bdpo.diffusion import networks

    fused_linear = functools.partial(networks.narrow_linear, fuse=True)
    torch.manual_seed(0)
    x = torch.randn(4, 3, in_f, requires_grad=True)
    w = torch.randn(out_f, in_f, requires_grad=True)
    b = torch.randn(out_f, requires_grad=True)
    out, graph = _traced_graphs(fused_linear, x, w, b)
    assert "linear" not in graph, graph  # wider maps: a matmul (F.linear's terms), see narrow_linear
    assert ("sum" in graph) == fused and ("matmul" in graph) != fused, graph
    ref = nn.functional.linear(x, w, b)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.pow(2).sum(), (x, w, b))
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), (x, w, b))
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-4)
    # an ensemble of 5 members over shared inputs, as the critics' vmap runs them
    ws, bs = torch.randn(5, out_f, in_f), torch.randn(5, out_f)
    out, _ = _traced_graphs(lambda x, w, b: torch.vmap(fused_linear, (None, 0, 0))(x, w, b), x, ws, bs)
    for k in range(5):
        torch.testing.assert_close(out[k], nn.functional.linear(x, ws[k], bs[k]), rtol=1e-5, atol=1e-5)


def test_narrow_linear_where_it_applies():
    """False (the default) keeps every graph on F.linear, ``"cuda"`` keeps CPU graphs there, eager
    calls never change, and another setting is a clear error, compiled or not."""
    from torchrl_bdpo.diffusion import networks

    x, w = torch.randn(4, 6), torch.randn(32, 6)
    for kwargs in ({}, {"fuse": "cuda"}, {"fuse": False}):
        _, graph = _traced_graphs(lambda x, w: networks.narrow_linear(x, w, **kwargs), x, w)
        assert "linear" in graph and "sum" not in graph, kwargs
    _, graph = _traced_graphs(lambda x, w: networks.narrow_linear(x, w, fuse=True), x, w)
    assert "linear" not in graph and "sum" in graph
    torch.testing.assert_close(networks.narrow_linear(x, w, fuse=True), nn.functional.linear(x, w), rtol=0, atol=0)
    for fn in (networks.narrow_linear, torch.compile(networks.narrow_linear, backend="eager")):
        with pytest.raises(ValueError, match="fuse_narrow='gpu': expected False"):
            fn(x, w, fuse="gpu")


def test_fuse_narrow_linear_is_each_networks_own_setting():
    """No process-wide state: set_fuse_narrow_linear sets every layer of the module it is given
    (and no other module's), the context manager restores each layer's own value, and a refused
    setting changes nothing. A compiled network traces with its own setting."""
    from torchrl_bdpo.diffusion import networks

    eps = networks.EpsilonNetwork(2, 3, hidden=16, depth=2)
    q = networks.QValueNetwork(3, 2, hidden=16)
    fusing = [m for m in eps.modules() if hasattr(type(m), "fuse_narrow")]
    assert len(fusing) == 1 + 3  # the network (its first layer's action part) and its 3 Linear layers
    assert {m.fuse_narrow for m in fusing} == {False}
    assert networks.set_fuse_narrow_linear(eps, True) is eps
    assert {m.fuse_narrow for m in eps.modules() if hasattr(type(m), "fuse_narrow")} == {True}
    assert {m.fuse_narrow for m in q.modules() if hasattr(type(m), "fuse_narrow")} == {False}  # untouched
    eps.body[-1].fuse_narrow = False  # one layer's own value
    with networks.fuse_narrow_linear(eps, "cuda"):
        assert {m.fuse_narrow for m in fusing} == {"cuda"}
    assert [m.fuse_narrow for m in fusing] == [True, True, True, False]
    with pytest.raises(ValueError, match="fuse_narrow='gpu': expected False"):
        networks.set_fuse_narrow_linear(eps, "gpu")
    assert [m.fuse_narrow for m in fusing] == [True, True, True, False]
    # traced: a Q network's action part (2 inputs) and 1-wide head are sums only when it says so
    net = networks.QValueNetwork(3, 2, hidden=16)
    s, a = torch.randn(5, 3), torch.randn(5, 2)
    for setting, sums in ((False, False), (True, True)):
        networks.set_fuse_narrow_linear(net, setting)
        out, graph = _traced_graphs(net, s, a)
        assert ("sum" in graph) == sums, setting
        torch.testing.assert_close(out, networks.set_fuse_narrow_linear(net, False)(s, a), rtol=1e-5, atol=1e-5)


def test_narrow_linear_inductor_values_and_gradients():
    """The sums through inductor's own code (CPU): F.linear's values and gradients."""
    from torchrl_bdpo.diffusion import networks

    torch.manual_seed(0)
    net = networks.set_fuse_narrow_linear(networks.mlp(6, 64, 2, 1, layer_norm=True), True)  # a critic: 6 inputs, a 1-wide head
    x = torch.randn(256, 6, requires_grad=True)
    ref = net(x)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), [x, *net.parameters()])
    torch._dynamo.reset()
    out = torch.compile(net)(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.pow(2).sum(), [x, *net.parameters()])
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_mish_module_eager_is_atens():
    """Eager calls, with or without autograd, are ATen's kernel and its gradient, bit for bit."""
    from torchrl_bdpo.speed.kernels import Mish

    x = torch.cat([torch.randn(10_000) * 8, torch.linspace(-30, 30, 601), torch.tensor([-1e4, 20.0, 1e4])])
    ref = nn.functional.mish(x)
    with torch.no_grad():
        assert torch.equal(Mish()(x), ref)
    xg = x.clone().requires_grad_()
    out = Mish()(xg)
    assert torch.equal(out, ref) and out.grad_fn is not None
    (g,) = torch.autograd.grad(out.sum(), xg)
    (g_ref,) = torch.autograd.grad(nn.functional.mish(xg).sum(), xg)
    assert torch.equal(g, g_ref)


@pytest.mark.parametrize("obs_dim", [3, 0])
def test_chain_cache_matches_plain_forward_values_and_gradients(obs_dim):
    torch.manual_seed(0)
    net = EpsilonNetwork(2, obs_dim, hidden=16, time_dim=8)
    a = torch.randn(4, 6, 2)
    s = torch.randn(4, obs_dim) if obs_dim else None
    cache = net.chain_cache(s, 5)
    assert cache.time.shape == (6, 16)
    assert (cache.observation is None) == (obs_dim == 0)
    if obs_dim:  # [4, H] -> [4, 1, H] against actions [4, 6, 2]
        cache = cache._replace(observation=cache.observation.unsqueeze(-2))
    s_full = s.unsqueeze(-2).expand(4, 6, obs_dim) if obs_dim else None
    for n in (0, 1, 5):
        cached = net(a, n, cache=cache)
        plain = net(a, n, s_full)
        torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-6)
    # the same gradients for every parameter (the split first layer included)
    g_cached = torch.autograd.grad(net(a, 3, cache=net.chain_cache(s, 5) if not obs_dim else cache).sum(), list(net.parameters()))
    g_plain = torch.autograd.grad(net(a, 3, s_full).sum(), list(net.parameters()))
    for gc, gp in zip(g_cached, g_plain):
        torch.testing.assert_close(gc, gp, rtol=1e-4, atol=1e-5)


def test_chain_cache_bad_input():
    net = EpsilonNetwork(2, 3, hidden=16)
    cache = net.chain_cache(torch.randn(4, 3), 5)
    with pytest.raises(ValueError, match=r"step has dtype torch.float32: expected integer"):
        net(torch.randn(4, 2), torch.tensor([1.0, 2.0, 3.0, 4.0]), cache=cache)
    with pytest.raises(ValueError, match=r"step=6 .*expected an integer in \[0, 5\] or a long tensor"):
        net(torch.randn(4, 2), 6, cache=cache)
    with pytest.raises(ValueError, match=r"action has shape \(4, 5\)"):
        net(torch.randn(4, 5), 1, cache=cache)
    with pytest.raises(ValueError, match=r"observation has shape \(4, 7\)"):
        net.chain_cache(torch.randn(4, 7), 5)
    with pytest.raises(ValueError, match="observation is None"):
        net.chain_cache(None, 5)
    with pytest.raises(ValueError, match="num_steps=0"):
        net.chain_cache(torch.randn(4, 3), 0)


def test_chain_cache_with_tensor_steps_and_expanded_inputs():
    # per-row steps are looked up in the cache's time table; dimensions an input was expanded
    # along are computed once: the same values as the plain forward on the expanded tensors
    torch.manual_seed(0)
    net = EpsilonNetwork(2, 3, hidden=16, time_dim=8)
    s = torch.randn(4, 3)
    s_exp = s.unsqueeze(0).unsqueeze(-2).expand(5, 4, 6, 3)  # [N, rows, M, obs]
    n = torch.arange(1, 6).view(5, 1, 1).expand(5, 4, 6)
    a = torch.randn(5, 4, 6, 2)
    cache = net.chain_cache(s_exp, 5)
    assert cache.observation.shape == (1, 4, 1, 16)  # computed on the 4 distinct rows
    torch.testing.assert_close(net(a, n, cache=cache), net(a, n, s_exp), rtol=1e-5, atol=1e-6)
    n_rand = torch.randint(0, 6, (4,))
    a2 = torch.randn(4, 2)
    torch.testing.assert_close(net(a2, n_rand, cache=net.chain_cache(s, 5)), net(a2, n_rand, s), rtol=1e-5, atol=1e-6)
    with pytest.raises(IndexError):
        net(a2, torch.tensor([0, 1, 2, 6]), cache=net.chain_cache(s, 5))


@pytest.mark.parametrize("idx_shape", [(7,), (4, 1, 3), (1, 5)])
def test_lookup_rows_equals_indexing_values_and_gradients(idx_shape):
    # the time tables' lookup (index_select) against plain indexing: values and table
    # gradients, eager, compiled and under vmap (value ensembles)
    torch.manual_seed(0)
    table = torch.randn(6, 4, requires_grad=True)
    idx = torch.randint(0, 6, idx_shape)
    idx[(0,) * len(idx_shape)] = 5  # repeated and boundary rows
    grad_out = torch.randn(*idx_shape, 4)
    ref = table[idx]
    (g_ref,) = torch.autograd.grad(ref, table, grad_out)
    for fn in (_lookup_rows, torch.compile(_lookup_rows, fullgraph=True)):
        out = fn(table, idx.int())  # int32 steps too
        assert out.shape == (*idx_shape, 4)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        (g,) = torch.autograd.grad(out, table, grad_out)
        torch.testing.assert_close(g, g_ref)
    tables = torch.randn(3, 6, 4, requires_grad=True)
    idxs = torch.randint(0, 6, (3, *idx_shape))
    grads = torch.randn(3, *idx_shape, 4)
    for in_dims, i in (((0, 0), idxs), ((0, None), idx)):
        out = torch.vmap(_lookup_rows, in_dims=in_dims)(tables, i)
        ref = torch.vmap(lambda t, j: t[j], in_dims=in_dims)(tables, i)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        (g,) = torch.autograd.grad(out, tables, grads)
        (g_ref,) = torch.autograd.grad(ref, tables, grads)
        torch.testing.assert_close(g, g_ref)
    for bad in (-1, 6):  # no wrap-around for negative steps
        with pytest.raises(IndexError, match="index out of range"):
            _lookup_rows(table, torch.tensor([0, bad]))
    # tables of other ranks (one value per step, or a matrix per step) take the same path
    for shape in ((6,), (6, 2, 3)):
        t = torch.randn(shape, requires_grad=True)
        g_out = torch.randn(*idx_shape, *shape[1:])
        out = _lookup_rows(t, idx)
        torch.testing.assert_close(out, t[idx], rtol=0, atol=0)
        torch.testing.assert_close(torch.autograd.grad(out, t, g_out)[0], torch.autograd.grad(t[idx], t, g_out)[0])


@pytest.mark.parametrize("obs_dim", [3, 0])
def test_value_network_time_table_equals_plain_forward(obs_dim):
    # num_steps=N: the time branch and the first layer's time part once per step 0..N, the
    # observation part once per distinct (non-expanded) observation; values and gradients are
    # the plain forward's, with the same parameters (state_dict keys and tensors)
    torch.manual_seed(0)
    plain = DiffusionValueNetwork(obs_dim, 2, hidden=16, time_dim=8)
    table = DiffusionValueNetwork(obs_dim, 2, hidden=16, time_dim=8, num_steps=5)
    table.load_state_dict(plain.state_dict())
    assert list(table.state_dict()) == list(plain.state_dict())
    s = torch.randn(4, obs_dim)
    s_exp = s.unsqueeze(-2).expand(4, 6, obs_dim)  # BDPO's M samples per state
    a = torch.randn(4, 6, 2)
    n = torch.randint(1, 6, (4,))
    n_exp = (n - 1).unsqueeze(-1).expand(4, 6)
    for step in (0, 3, 5, n_exp, torch.randint(0, 6, (4, 6))):
        torch.testing.assert_close(table(s_exp, a, step), plain(s_exp, a, step), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(table(s, a[:, 0], n), plain(s, a[:, 0], n), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(table(s[:1], a, 2), plain(s[:1], a, 2), rtol=1e-5, atol=1e-6)  # obs broadcast
    torch.testing.assert_close(table(s_exp, a, n[:1]), plain(s_exp, a, n[:1]), rtol=1e-5, atol=1e-6)  # step broadcast
    for net in (table, plain):  # a step per state against [4, 6] actions: refused alike, never misaligned
        with pytest.raises(RuntimeError, match="expanded size"):
            net(s_exp, a, n)
    a_req = a.clone().requires_grad_()
    a_ref = a.clone().requires_grad_()
    params = list(table.parameters())
    g_table = torch.autograd.grad(table(s_exp, a_req, n_exp).pow(2).sum(), params + [a_req])
    g_plain = torch.autograd.grad(plain(s_exp, a_ref, n_exp).pow(2).sum(), list(plain.parameters()) + [a_ref])
    assert len(g_table) == len(g_plain)
    for gt, gp in zip(g_table, g_plain):
        torch.testing.assert_close(gt, gp, rtol=1e-4, atol=1e-5)


def test_value_network_time_table_bad_input():
    with pytest.raises(ValueError, match=r"num_steps=0: expected the policy's number of diffusion steps"):
        DiffusionValueNetwork(3, 2, num_steps=0)
    with pytest.raises(ValueError, match=r"num_steps=True"):
        DiffusionValueNetwork(3, 2, num_steps=True)
    v = DiffusionValueNetwork(3, 2, hidden=16, num_steps=5)
    s, a = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"step=6: expected an integer in \[0, 5\] \(num_steps=5\)"):
        v(s, a, 6)
    with pytest.raises(ValueError, match=r"step has dtype torch.float32: expected integer"):
        v(s, a, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(IndexError):
        v(s, a, torch.tensor([0, 1, 2, 6]))
    with pytest.raises(ValueError, match=r"observation has shape \(4, 7\)"):
        v(torch.randn(4, 7), a, 1)


def test_q_network_first_layer_in_two_parts_equals_the_concatenated_input():
    """Q's first layer runs its observation part once per distinct observation and its action part
    apart: the values and gradients of ``Linear(concat[s, a])``, state_dict unchanged."""
    torch.manual_seed(0)
    net = QValueNetwork(3, 2, hidden=16, layer_norm=True)
    assert [k for k in net.state_dict()][:2] == ["body.0.weight", "body.0.bias"]
    s = torch.randn(4, 3)
    s_exp = s.unsqueeze(-2).expand(4, 6, 3)  # BDPO's M samples per state
    a = torch.randn(4, 6, 2, requires_grad=True)
    out = net(s_exp, a)
    ref = net.body(torch.cat([s_exp, a], -1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net(s.unsqueeze(-2), a), ref, rtol=1e-5, atol=1e-6)  # broadcast observation
    params = [a, *net.parameters()]
    for g, g_ref in zip(torch.autograd.grad(out.sum(), params), torch.autograd.grad(ref.sum(), params)):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    blind = QValueNetwork(0, 2, hidden=16)  # no observation: the action part and the bias
    torch.testing.assert_close(blind(torch.randn(6, 0), a[0]), blind.body(a[0]), rtol=1e-5, atol=1e-6)
