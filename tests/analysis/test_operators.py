"""The operator protocol, the model + loss + data convenience layer and ``method="auto"``.

References: dense float64 Hessians and GGNs (:func:`analysis.reference.dense_hessian`, built on
``torch.autograd.functional.hessian``) and dense matrices with known spectra.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from analysis import (
    GGNOperator,
    HessianOperator,
    LinearOperator,
    as_linear_operator,
    hessian_trace,
    spectral_density,
    top_eigenpairs,
)
from analysis import operators as ops
from analysis.operators import auto as auto_module
from analysis.reference import dense_ggn, dense_hessian
from tests.analysis.test_hessian import _NoForwardModel, _NoForwardTanh
from tests.models import classification_data, cnn_bn, image_data, mlp

RTOL, ATOL = 1e-8, 1e-11
EXPLICIT = ["forward-over-reverse", "double-backward", "cached-graph"]


class DiagonalOperator:
    """A user's own operator: satisfies the protocol without inheriting from anything."""

    def __init__(self, d: torch.Tensor):
        self.d = d
        self.shape = (d.numel(), d.numel())
        self.dtype, self.device = d.dtype, d.device
        self.num_matvecs = 0

    def matvec(self, v):
        self.num_matvecs += 1
        return self.d * v

    def matmat(self, V):
        self.num_matvecs += V.shape[1]
        return self.d[:, None] * V

    def __matmul__(self, x):
        return self.matmat(x) if x.dim() == 2 else self.matvec(x)

    def to_scipy(self):
        return ops.to_scipy_operator(self)


class MatvecOnly:
    """An object with ``shape`` and ``matvec`` only: not the protocol, wrapped by the adapter."""

    def __init__(self, A):
        self.A, self.shape = A, tuple(A.shape)

    def matvec(self, v):
        return self.A @ v


def _problem(batch_size=None):
    return mlp(), "cross_entropy", classification_data(), batch_size


def test_the_operators_satisfy_the_protocol_and_agree_with_dense():
    model, loss, data, _ = _problem()
    A = dense_hessian(model, loss, data)
    G_ref = dense_ggn(model, loss, data)
    cases = [(HessianOperator(model, loss, data, batch_size=7), A),
             (GGNOperator(model, loss, data, batch_size=7), G_ref),
             (as_linear_operator(A), A),
             (as_linear_operator(MatvecOnly(A)), A),
             (DiagonalOperator(torch.diagonal(A).clone()), torch.diag(torch.diagonal(A)))]
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(A.shape[0], generator=gen, dtype=torch.float64)
    V = torch.randn(A.shape[0], 3, generator=gen, dtype=torch.float64)
    for op, ref in cases:
        assert isinstance(op, LinearOperator), type(op).__name__
        assert op.shape == tuple(ref.shape) and op.dtype == torch.float64
        torch.testing.assert_close(op.matvec(v), ref @ v, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(op @ v, ref @ v, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(op.matmat(V), ref @ V, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(op @ V, ref @ V, rtol=RTOL, atol=ATOL)
        sp = op.to_scipy()
        np.testing.assert_allclose(sp.matvec(v.numpy()), (ref @ v).numpy(), rtol=1e-8, atol=1e-11)
    assert not isinstance(MatvecOnly(A), LinearOperator)
    assert not isinstance(A, LinearOperator)


def test_every_algorithm_takes_a_users_protocol_operator():
    d = torch.cat([torch.linspace(0.1, 1.0, 30), torch.tensor([4.0, 7.0])]).double()
    op = DiagonalOperator(d)
    assert as_linear_operator(op) is op  # used as is, not wrapped
    eig = top_eigenpairs(op, k=2, tol=1e-8)
    torch.testing.assert_close(eig.eigenvalues, torch.tensor([7.0, 4.0], dtype=torch.float64))
    tr = hessian_trace(op, num_matvecs=3 * d.numel())  # the sketch spans R^n: exact
    assert tr.estimate == pytest.approx(float(d.sum()), rel=1e-10)
    dens = spectral_density(op, num_iter=32, num_runs=2)
    np.testing.assert_allclose(dens.nodes.max(), 7.0, rtol=1e-8)
    same = spectral_density(torch.diag(d), num_iter=32, num_runs=2)  # the tensor adapter
    np.testing.assert_allclose(dens.nodes, same.nodes, rtol=1e-10)
    assert op.num_matvecs == eig.num_matvecs + tr.num_matvecs + dens.num_matvecs


@pytest.mark.parametrize("call", ["top_eigenpairs", "hessian_trace", "spectral_density"])
def test_a_mistyped_operator_keyword_is_a_type_error_naming_it(call):
    """Regression: ``top_eigenpairs(model, loss, data, modee=...)`` reached HessianOperator
    unchecked; the error now names the keyword and the allowed ones."""
    model, loss, data, _ = _problem()
    fn = {"top_eigenpairs": top_eigenpairs, "hessian_trace": hessian_trace,
          "spectral_density": spectral_density}[call]
    with pytest.raises(TypeError, match=r"'modee'.*params, mode, check_deterministic, "
                                        r"batch_size, method"):
        fn(model, loss, data, modee="train")


def test_operator_keywords_with_an_operator_are_refused():
    model, loss, data, _ = _problem()
    H = HessianOperator(model, loss, data)
    with pytest.raises(TypeError, match="batch_size"):
        top_eigenpairs(H, batch_size=4)
    with pytest.raises(ValueError, match="only with a model"):
        hessian_trace(H, loss, data)
    with pytest.raises(ValueError, match="product method"):
        hessian_trace(model, loss, data, method="cached-graph")


def test_old_call_forms_give_the_same_numbers():
    model, loss, data, _ = _problem()
    kw = {"batch_size": 7, "method": "double-backward"}
    a = top_eigenpairs(model, loss, data, k=2, **kw)
    b = top_eigenpairs(HessianOperator(model, loss, data, **kw), k=2)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.num_matvecs == b.num_matvecs
    a = spectral_density(model, loss, data, num_iter=10, num_runs=2, **kw)
    b = spectral_density(HessianOperator(model, loss, data, **kw), num_iter=10, num_runs=2)
    assert np.array_equal(a.nodes, b.nodes)
    t1 = hessian_trace(model, loss, data, num_matvecs=30, batch_size=7)  # default product method
    t2 = hessian_trace(HessianOperator(model, loss, data, batch_size=7), num_matvecs=30)
    assert t1.estimate == pytest.approx(t2.estimate, rel=1e-12)  # methods agree to rounding


def _auto_cases():
    x, y = classification_data()
    return {
        "one-batch": (mlp(), (x, y), None),
        "bs7-uneven": (mlp(), (x, y), 7),
        "cnn-eval-bs10": (cnn_bn().eval(), image_data(), 10),
        "loader": (mlp(), DataLoader(TensorDataset(x, y), batch_size=16), None),
    }


@pytest.mark.parametrize("case", sorted(_auto_cases()))
def test_auto_matches_every_explicit_method_and_the_dense_hessian(case):
    model, data, bs = _auto_cases()[case]
    ref = dense_hessian(model, "cross_entropy", data, batch_size=bs)
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(ref.shape[0], 3, generator=gen, dtype=torch.float64)
    H = HessianOperator(model, "cross_entropy", data, batch_size=bs)
    assert H.method == "auto" and H.auto_choice is None  # settled at the first product
    hv = H @ V[:, 0]
    choice = H.auto_choice
    assert H.method == choice.method and H.num_matvecs == 1  # the timings are not counted
    assert choice.timings[choice.method] == min(choice.timings.values())
    assert {"forward-over-reverse", "double-backward"} <= set(choice.timings)
    if case == "loader":
        assert "DataLoader" in choice.skipped["cached-graph"]
    else:
        assert "cached-graph" in choice.timings and choice.graph_bytes > 0
    torch.testing.assert_close(hv, ref @ V[:, 0], rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(H @ V, ref @ V, rtol=1e-6, atol=1e-10)
    for method in EXPLICIT:
        if method == "cached-graph" and case == "loader":
            continue
        E = HessianOperator(model, "cross_entropy", data, batch_size=bs, method=method)
        torch.testing.assert_close(E @ V[:, 0], hv, rtol=1e-10, atol=1e-13)
    assert choice.to_dict()["method"] == choice.method


def _fake_times(monkeypatch, *times):
    """Time the choice's calls (graph build, backward, forward-over-reverse, in this order) as
    ``times``; the calls still run (their products are used)."""
    it = iter(times)
    monkeypatch.setattr(auto_module, "_timed", lambda fn, device: (fn(), next(it))[1])


def test_auto_keeps_the_fastest_and_respects_the_cache_budget(monkeypatch):
    model, loss, data, _ = _problem()
    _fake_times(monkeypatch, 1.0, 2.0, 2.5)  # build, backward through it, forward-over-reverse
    H = HessianOperator(model, loss, data, batch_size=7)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    H.gradient()  # builds the graphs the cached graph would; the choice waits for a product
    assert H.method == "auto" and len(H._graphs) == len(H._cached)
    H @ v
    assert H.method == "cached-graph"
    assert H.auto_choice.timings == {"cached-graph": 2.0, "double-backward": 3.0,
                                     "forward-over-reverse": 2.5}
    assert H.auto_choice.derived == ("double-backward",) and H.auto_choice.extra_products == 1
    monkeypatch.setattr(auto_module, "CACHE_BYTES", 16)
    for times, method in (((1.0, 1.0, 3.0), "double-backward"),
                          ((1.0, 1.0, 1.5), "forward-over-reverse")):
        _fake_times(monkeypatch, *times)
        H = HessianOperator(model, loss, data, batch_size=7)
        torch.testing.assert_close(H @ v, dense_hessian(model, loss, data) @ v,
                                   rtol=1e-6, atol=1e-10)
        assert H.method == method and not H._graphs  # graphs not used are dropped
        assert "CACHE_BYTES" in H.auto_choice.skipped["cached-graph"]
    _fake_times(monkeypatch, 1.0, 1.0, 1.0)
    one = HessianOperator(model, loss, data)  # one batch: its graph is built by any method
    one @ v
    assert one.method == "cached-graph"  # ties go to the cached graph


def test_the_choice_costs_one_extra_product_of_the_first_batch_and_reuses_the_first():
    """Forward passes of the loss: a settled double-backward product makes one per batch; the
    first product under "auto" makes one more (forward-over-reverse on the first batch)."""
    model, _, data, _ = _problem()
    calls = []

    def counted(out, y):
        calls.append(1)
        return torch.nn.functional.cross_entropy(out, y)

    v = torch.randn(53, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    ref = dense_hessian(model, "cross_entropy", data) @ v
    for bs in (None, 7):  # one batch, 7 batches
        batches = 1 if bs is None else -(-48 // bs)
        D = HessianOperator(model, counted, data, batch_size=bs, method="double-backward")
        calls.clear()
        D @ v
        assert len(calls) == batches
        H = HessianOperator(model, counted, data, batch_size=bs)
        calls.clear()
        torch.testing.assert_close(H @ v, ref, rtol=1e-6, atol=1e-10)
        assert len(calls) == batches + 1 and H.auto_choice.extra_products == 1
        assert H.num_matvecs == 1


class _TanhWithoutJvp(_NoForwardTanh):
    """tanh whose forward-mode derivative raises a RuntimeError (every time)."""

    @staticmethod
    def jvp(ctx, t):
        raise RuntimeError("this tanh has no forward-mode derivative")


class _RuntimeErrorForwardModel(_NoForwardModel):
    """Reverse mode works, forward mode raises the same RuntimeError at every call."""

    def forward(self, x):
        return self.b(_TanhWithoutJvp.apply(self.a(x)))


@pytest.mark.parametrize("model_cls, error, tries", [
    (_NoForwardModel, "NotImplementedError", 1),  # torch: no jvp: skipped at once
    (_RuntimeErrorForwardModel, "RuntimeError", 2),  # the same error twice: skipped
], ids=["not-implemented", "runtime-error-twice"])
def test_auto_skips_forward_mode_when_the_model_has_none(model_cls, error, tries):
    model, data = model_cls(), classification_data()
    H = HessianOperator(model, "cross_entropy", data, batch_size=20)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(H @ v, dense_hessian(model, "cross_entropy", data) @ v,
                               rtol=1e-6, atol=1e-10)
    assert H.auto_choice.skipped["forward-over-reverse"].startswith(error)
    assert "forward-over-reverse" not in H.auto_choice.timings
    assert H.method in ("double-backward", "cached-graph")
    assert H.auto_choice.extra_products == tries  # failed calls, the product's own reused


@pytest.mark.parametrize("v0", ["random", "gradient"])
@pytest.mark.parametrize("fail_at", [1, 2])
def test_an_error_of_the_loss_during_the_choice_is_raised(v0, fail_at):
    """Regression: a loss that raises once during the choice (the graph build, or the timed
    forward-over-reverse product) used to be swallowed as "method skipped", and top_eigenpairs
    returned normally."""
    model, _, data, _ = _problem()
    calls = None

    def flaky(out, y):
        if calls is not None:
            calls.append(1)
            if len(calls) == fail_at:
                raise RuntimeError("the loss failed once")
        return torch.nn.functional.cross_entropy(out, y)

    H = HessianOperator(model, flaky, data, batch_size=16)
    calls = []  # counted from here (the construction ran the loss too)
    with pytest.raises(RuntimeError, match="the loss failed once"):
        top_eigenpairs(H, k=1, v0=v0)


def test_cache_budget_is_a_share_of_the_available_memory(monkeypatch):
    """Unset, the budget is CACHE_FRACTION of the host's MemAvailable (read here from
    /proc/meminfo independently), the fallback where nothing can be read, CACHE_BYTES when set;
    the reason for skipping the cached graph names the budget."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pytest.skip("no /proc/meminfo")
    got = auto_module.cache_budget("cpu")
    assert got == pytest.approx(auto_module.CACHE_FRACTION * avail, rel=0.2)
    monkeypatch.setattr(auto_module, "available_bytes", lambda device: None)
    assert auto_module.cache_budget("cpu") == auto_module.FALLBACK_CACHE_BYTES
    monkeypatch.setattr(auto_module, "available_bytes", lambda device: 4000)
    monkeypatch.setattr(auto_module, "_timed", lambda fn, device: (fn(), 1.0)[1])
    model, loss, data, _ = _problem()
    H = HessianOperator(model, loss, data, batch_size=7)
    H.resolve_method()
    assert H.auto_choice.cache_budget == 250 < H.auto_choice.graph_bytes
    assert "cache budget 250: 0.0625 of the memory available on cpu" in (
        H.auto_choice.skipped["cached-graph"])
    monkeypatch.setattr(auto_module, "CACHE_BYTES", 10**9)
    H = HessianOperator(model, loss, data, batch_size=7)
    H.resolve_method()
    assert H.auto_choice.cache_budget == 10**9 and "cached-graph" in H.auto_choice.timings
    for bad in (-1, 2.5, "1GB", True):
        monkeypatch.setattr(auto_module, "CACHE_BYTES", bad)
        with pytest.raises(ValueError, match=f"CACHE_BYTES must be None or a non-negative int.*{bad!r}"):
            auto_module.cache_budget("cpu")


def test_auto_keeps_the_calibration_graph_of_the_first_batch(monkeypatch):
    """When the cached graph wins, the first batch's graph built to calibrate is reused: one
    graph build per batch in all, and the products are still the dense Hessian's."""
    model, loss, data, _ = _problem()
    _fake_times(monkeypatch, 1.0, 2.0, 3.0)  # build, backward, forward-over-reverse
    H = HessianOperator(model, loss, data, batch_size=7)
    builds = []
    real = H._first_order_graph
    monkeypatch.setattr(H, "_first_order_graph", lambda *a: builds.append(1) or real(*a))
    assert H.resolve_method() == "cached-graph"
    builds.clear()  # the choice built the first batch's graph
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    hv = H @ v
    assert len(builds) == len(H._cached) - 1 > 0
    torch.testing.assert_close(hv, dense_hessian(model, loss, data) @ v, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(H @ v, hv, rtol=0, atol=0)
    assert len(builds) == len(H._cached) - 1
    with torch.no_grad():  # a changed model still drops every graph, the kept one too
        next(model.parameters()).add_(0.1)
    torch.testing.assert_close(H @ v, dense_hessian(model, loss, data) @ v, rtol=1e-6, atol=1e-10)
    assert len(builds) == 2 * len(H._cached) - 1


def test_auto_gradient_matches_autograd():
    model, loss, data, _ = _problem()
    H = HessianOperator(model, loss, data, batch_size=7)
    x, y = data
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(H.gradient(), ref, rtol=1e-10, atol=1e-13)


def test_restricted_is_the_dense_diagonal_block():
    model, loss, data, _ = _problem()
    A = dense_hessian(model, loss, data)
    H = HessianOperator(model, loss, data, batch_size=7, method="forward-over-reverse")
    block = H.restricted(["2.weight", "2.bias"])
    n2 = block.shape[0]
    assert block.method == "forward-over-reverse" and n2 == 5 * 3 + 3
    v = torch.randn(n2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(block @ v, A[-n2:, -n2:] @ v, rtol=RTOL, atol=ATOL)
    G = GGNOperator(model, loss, data).restricted(["0.bias"])
    torch.testing.assert_close(G @ torch.ones(5, dtype=torch.float64),
                               dense_ggn(model, loss, data)[30:35, 30:35].sum(1),
                               rtol=RTOL, atol=ATOL)


def test_auto_times_the_batched_variants_when_first_used_on_a_block():
    model, loss, data, _ = _problem()
    ref = dense_hessian(model, loss, data)
    V = torch.randn(ref.shape[0], 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    H = HessianOperator(model, loss, data, batch_size=7)
    HV = H.matmat(V, block_size=4)
    choice = H.auto_choice
    assert choice.block == 4 and set(choice.timings) == set(EXPLICIT)
    assert H.method == choice.method and H.num_matvecs == 6
    torch.testing.assert_close(HV, ref @ V, rtol=1e-6, atol=1e-10)
    one = HessianOperator(model, loss, data, batch_size=7)
    one @ V[:, 0]
    assert one.auto_choice.block == 1


def test_auto_keeps_the_graphs_of_the_first_batches_that_fit_the_budget(monkeypatch):
    """A budget for 3.5 of the 7 batches' graphs: "auto" keeps the first 3 (graphs_fit's count),
    the other 4 build theirs at every product (once per block for ``op @ V``); the cached
    graph's time is then the backward plus the first batch's build times the uncached share
    of the loss terms (27 of 48). Products, blocks and the gradient stay the dense ones."""
    model, loss, data, _ = _problem()
    monkeypatch.setattr(auto_module, "CACHE_BYTES", 10**12)
    _fake_times(monkeypatch, 1.0, 1.0, 5.0)
    whole = HessianOperator(model, loss, data, batch_size=7)
    whole.resolve_method()
    assert whole.auto_choice.cache_batches == 7 and whole.cache_batches == 7
    first = whole.auto_choice.graph_bytes * 7 / 48  # batches of 7 (six) and 6 samples
    monkeypatch.setattr(auto_module, "CACHE_BYTES", int(3.5 * first))
    _fake_times(monkeypatch, 1.0, 1.0, 5.0)  # build, backward, forward-over-reverse
    H = HessianOperator(model, loss, data, batch_size=7)
    builds = []
    real = H._first_order_graph
    monkeypatch.setattr(H, "_first_order_graph", lambda *a: builds.append(1) or real(*a))
    A = dense_hessian(model, loss, data)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(H @ v, A @ v, rtol=1e-6, atol=1e-10)
    choice = H.auto_choice
    assert H.method == "cached-graph" and choice.cache_batches == H.cache_batches == 3
    assert choice.timings["cached-graph"] == pytest.approx(1.0 + 1.0 * 27 / 48)
    assert choice.timings["double-backward"] == 2.0 and "cached-graph" not in choice.skipped
    assert sorted(H._graphs) == [0, 1, 2]
    builds.clear()
    torch.testing.assert_close(H @ v, A @ v, rtol=1e-6, atol=1e-10)
    assert len(builds) == 4 and sorted(H._graphs) == [0, 1, 2]
    builds.clear()
    V = torch.randn(H.shape[0], 5, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(H.matmat(V, block_size=5), A @ V, rtol=1e-6, atol=1e-10)
    assert len(builds) == 4  # one build per uncached batch for the whole block
    x, y = data
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(H.gradient(), grad, rtol=1e-10, atol=1e-13)
    assert H.restricted(["2.weight"]).cache_batches == 3


def test_graphs_fit_counts_the_leading_batches_within_the_budget(monkeypatch):
    model, loss, data, _ = _problem()
    H = HessianOperator(model, loss, data, batch_size=7, method="double-backward")
    # 100 bytes for the first batch of 7 samples: six batches of 100, the last (6) 600/7
    for budget, count in ((0, 0), (99, 0), (100, 1), (599, 5), (600, 6), (685, 6), (686, 7)):
        monkeypatch.setattr(auto_module, "CACHE_BYTES", budget)
        got = auto_module.graphs_fit(H, 100)
        assert got[0] == count and got[1] == int(100 * 48 / 7) and got[2] == budget
        assert ("cache budget" in got[3]) == (count == 0)
