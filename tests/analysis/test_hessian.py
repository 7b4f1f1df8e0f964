"""HessianOperator / GGNOperator against dense float64 references on small models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from analysis import GGNOperator, HessianOperator, directional_curvature
from analysis.reference import dense_ggn, dense_hessian
from tests.models import TiedFrozen, classification_data, cnn_bn, image_data, mlp, relu_mlp

RTOL, ATOL = 1e-6, 1e-10
_DENSE: dict = {}


def _dense(case: str, kind: str = "hessian") -> torch.Tensor:
    """Dense reference of a case (memoized: the case builders are deterministic)."""
    if (case, kind) not in _DENSE:
        model, loss, data = CASES[case]()
        fn = dense_hessian if kind == "hessian" else dense_ggn
        _DENSE[case, kind] = fn(model, loss, data)
    return _DENSE[case, kind]


def _mse(out, y):
    return F.mse_loss(out, y)


def _mlp_mse():
    x, _ = classification_data(n=30)
    y = torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return mlp(), _mse, (x, y)


CASES = {
    "mlp-ce": lambda: (mlp(), "cross_entropy", classification_data()),
    "relu-mlp-ce": lambda: (relu_mlp(), "cross_entropy", classification_data()),
    "mlp-mse": _mlp_mse,
    "cnn-bn-ce": lambda: (cnn_bn().train(), "cross_entropy", image_data()),
    "tied-frozen-ce": lambda: (TiedFrozen(), "cross_entropy", classification_data(d=5)),
}
METHODS = ["auto", "forward-over-reverse", "double-backward", "cached-graph"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch_size", [None, 7], ids=["one-batch", "bs7-uneven"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_hvp_matches_dense(case, batch_size, method):
    model, loss, data = CASES[case]()
    H = HessianOperator(model, loss, data, batch_size=batch_size, method=method)
    Hd = _dense(case)
    assert H.shape == tuple(Hd.shape)
    assert H.space.numel == Hd.shape[0]
    V = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(H @ V[:, 0], Hd @ V[:, 0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(H @ V, Hd @ V, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(H.matvec(V[:, 1]), Hd @ V[:, 1], rtol=RTOL, atol=ATOL)
    assert H.num_matvecs == 5


@pytest.mark.parametrize("case", sorted(CASES))
def test_ggn_matches_dense(case):
    model, loss, data = CASES[case]()
    G = GGNOperator(model, loss, data, batch_size=7)
    Gd = _dense(case, "ggn")
    V = torch.randn(G.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(G @ V, Gd @ V, rtol=RTOL, atol=ATOL)
    # positive semi-definite for cross-entropy and MSE
    assert torch.linalg.eigvalsh(Gd).min() > -1e-10


def test_uneven_last_batch_weighting_is_exact():
    model, loss, (x, y) = CASES["mlp-ce"]()
    Hd = dense_hessian(model, loss, (x, y))  # one batch of 48
    v = torch.randn(Hd.shape[0], dtype=torch.float64)
    for data in [(x, y), [(x[:20], y[:20]), (x[20:40], y[20:40]), (x[40:], y[40:])],
                 DataLoader(TensorDataset(x, y), batch_size=20, shuffle=False)]:
        H = HessianOperator(model, loss, data, batch_size=20 if isinstance(data, tuple) else None)
        torch.testing.assert_close(H @ v, Hd @ v, rtol=RTOL, atol=ATOL)
        assert H.num_samples == 48
    # the naive (unweighted) mean of batch Hessians differs, so the test above can fail
    parts = [dense_hessian(model, loss, (x[a:b], y[a:b])) for a, b in [(0, 20), (20, 40), (40, 48)]]
    naive = sum(parts) / 3
    assert (naive @ v - Hd @ v).abs().max() > 1e-4


def test_params_subset_is_the_dense_subblock():
    model, loss, data = CASES["mlp-ce"]()
    names = ["2.weight", "2.bias"]
    H = HessianOperator(model, loss, data, params=names)
    Hd_full = dense_hessian(model, loss, data)
    start = sum(p.numel() for n, p in model.named_parameters() if n not in names)
    sub = Hd_full[start:, start:]
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(H @ v, sub @ v, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(dense_hessian(model, loss, data, params=names), sub)


def test_mode_restored_and_running_stats_untouched():
    model, loss, data = CASES["cnn-bn-ce"]()
    model.train()
    model[5].eval()  # mixed flags must come back exactly
    flags = [m.training for m in model.modules()]
    stats = [b.clone() for b in model.buffers()]
    H = HessianOperator(model, loss, data)
    H @ torch.randn(H.shape[0], dtype=torch.float64)
    assert [m.training for m in model.modules()] == flags
    for a, b in zip(stats, model.buffers()):
        assert torch.equal(a, b)


def test_train_mode_batchnorm_when_allowed_leaves_stats():
    model, loss, data = CASES["cnn-bn-ce"]()
    stats = [b.clone() for b in model.buffers()]
    H = HessianOperator(model, loss, data, mode="train", check_deterministic=False)
    Hd = dense_hessian(model, loss, data, mode="train")
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(H @ v, Hd @ v, rtol=RTOL, atol=ATOL)
    for a, b in zip(stats, model.buffers()):
        assert torch.equal(a, b)


def _dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3)).double()


def test_determinism_check_fires():
    data = classification_data()
    model = _dropout_model()
    with pytest.raises(ValueError, match="Dropout"):
        HessianOperator(model, "cross_entropy", data, mode="train")
    model.train()
    with pytest.raises(ValueError, match="Dropout"):
        HessianOperator(model, "cross_entropy", data, mode=None)
    HessianOperator(model, "cross_entropy", data, mode="eval")  # fine: dropout inactive
    HessianOperator(model, "cross_entropy", data, mode="train", check_deterministic=False)
    with pytest.raises(ValueError, match="BatchNorm2d"):
        HessianOperator(cnn_bn().train(), "cross_entropy", image_data(), mode=None)
    x, y = data
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    with pytest.raises(ValueError, match="shuffle"):
        HessianOperator(mlp(), "cross_entropy", loader)


def test_cached_graph_follows_parameter_updates():
    model, loss, data = CASES["mlp-ce"]()
    H = HessianOperator(model, loss, data, method="cached-graph")
    v = torch.randn(H.shape[0], dtype=torch.float64)
    H @ v
    assert H.method == "cached-graph" and len(H._graphs) == 1
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.3)
    torch.testing.assert_close(H @ v, dense_hessian(model, loss, data) @ v, rtol=RTOL, atol=ATOL)


class _NoForwardTanh(torch.autograd.Function):
    """tanh with a (twice differentiable) backward but no forward-mode derivative."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _NoForwardModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 4).double()
        self.b = nn.Linear(4, 3).double()

    def forward(self, x):
        return self.b(_NoForwardTanh.apply(self.a(x)))


def test_double_backward_fallback():
    model = _NoForwardModel()
    data = classification_data()
    H = HessianOperator(model, "cross_entropy", data, method="forward-over-reverse")
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(H @ v, dense_hessian(model, "cross_entropy", data) @ v,
                               rtol=RTOL, atol=ATOL)
    assert H.method == "double-backward"


def test_directional_curvature():
    model, loss, data = CASES["tied-frozen-ce"]()
    H = HessianOperator(model, loss, data)
    Hd = dense_hessian(model, loss, data)
    d = torch.randn(H.shape[0], dtype=torch.float64)
    expected = float(d @ Hd @ d / (d @ d))
    assert directional_curvature(H, d) == pytest.approx(expected, rel=1e-9)
    assert directional_curvature(H, 7.5 * d) == pytest.approx(expected, rel=1e-9)  # scale-free
    with pytest.raises(ValueError, match="zero"):
        directional_curvature(H, torch.zeros_like(d))


def test_to_scipy():
    from scipy.sparse.linalg import eigsh

    model, loss, data = CASES["mlp-ce"]()
    H = HessianOperator(model, loss, data)
    Hd = dense_hessian(model, loss, data)
    A = H.to_scipy()
    assert A.shape == H.shape
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(torch.from_numpy(A @ v.numpy()), Hd @ v, rtol=RTOL, atol=ATOL)
    top = eigsh(A, k=1, which="LA", return_eigenvectors=False)[0]
    assert top == pytest.approx(torch.linalg.eigvalsh(Hd)[-1].item(), rel=1e-8)


def test_float32_model_and_float32_data_cast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))  # float32
    x, y = classification_data(dtype=torch.float64)  # float64 data is cast to the model's dtype
    H = HessianOperator(model, "cross_entropy", (x, y))
    assert H.dtype == torch.float32 and H.device == torch.device("cpu")
    v = torch.randn(H.shape[0])
    Hd = dense_hessian(model, "cross_entropy", (x, y))
    torch.testing.assert_close((H @ v).double(), Hd @ v.double(), rtol=1e-4, atol=1e-5)
    assert next(model.parameters()).dtype == torch.float32  # the reference did not cast the model


# -- bad input ---------------------------------------------------------------------------------
def test_bad_inputs():
    model = mlp()
    x, y = classification_data()
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(model, "cross_entropy", (x[:0], y[:0]))
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(model, "cross_entropy", [])
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        HessianOperator(frozen, "cross_entropy", (x, y))
    with pytest.raises(ValueError, match="mode"):
        HessianOperator(model, "cross_entropy", (x, y), mode="test")
    with pytest.raises(ValueError, match="method"):
        HessianOperator(model, "cross_entropy", (x, y), method="magic")
    with pytest.raises(ValueError, match="unknown loss"):
        HessianOperator(model, "hinge", (x, y))
    for method in METHODS:  # refused at construction (the first-batch check), before a product
        with pytest.raises(ValueError, match="scalar"):
            H = HessianOperator(model, lambda o, t: F.cross_entropy(o, t, reduction="none"),
                                (x, y), method=method)
            H @ torch.zeros(H.shape[0], dtype=torch.float64)
    H = HessianOperator(model, "cross_entropy", (x, y))
    n = H.shape[0]
    with pytest.raises(ValueError, match=r"shape \(52,\), expected \(53,\)"):
        H @ torch.zeros(n - 1, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        H @ torch.zeros(n, dtype=torch.float32)
    with pytest.raises(ValueError, match="device"):
        H @ torch.zeros(n, dtype=torch.float64, device="meta")
    with pytest.raises(TypeError, match="Tensor"):
        H @ [0.0] * n
    with pytest.raises(ValueError, match=r"\(53, k\)"):
        H.matmat(torch.zeros(n - 1, 2, dtype=torch.float64))


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_product_names_the_batch(method):
    model = mlp()
    x, y = classification_data()
    x = x.clone()
    x[25, 0] = float("nan")  # batch 2 of size 10
    H = HessianOperator(model, "cross_entropy", (x, y), batch_size=10 if method != "cached-graph"
                        else None, method=method)
    with pytest.raises(FloatingPointError, match="batch 2" if method != "cached-graph" else "batch 0"):
        H @ torch.ones(H.shape[0], dtype=torch.float64)


@pytest.mark.parametrize("method", METHODS)
def test_gradient_matches_autograd(method):
    from analysis.reference import dense_loss_function

    model, loss, data = CASES["cnn-bn-ce"]()
    f, w0 = dense_loss_function(model.eval(), loss, data)  # the operators use mode="eval"
    model.train()
    g_ref = torch.func.grad(f)(w0)
    H = HessianOperator(model, loss, data, method=method,
                        batch_size=None if method == "cached-graph" else 7)
    torch.testing.assert_close(H.gradient(), g_ref, rtol=1e-9, atol=1e-12)
    x, y = data
    L = HessianOperator(model, loss, DataLoader(TensorDataset(x, y), batch_size=7))
    torch.testing.assert_close(L.gradient(), g_ref, rtol=1e-9, atol=1e-12)


def test_ggn_double_vjp_fallback():
    model = _NoForwardModel()
    data = classification_data()
    G = GGNOperator(model, "cross_entropy", data)
    v = torch.randn(G.shape[0], dtype=torch.float64)
    torch.testing.assert_close(G @ v, dense_ggn(model, "cross_entropy", data) @ v,
                               rtol=RTOL, atol=ATOL)
    assert G.method == "double-vjp"


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 3).double()
        self.b = nn.Linear(2, 3).double()

    def forward(self, x, z):
        return torch.tanh(self.a(x)) * self.b(z)


def test_tuple_and_dict_inputs():
    x, y = classification_data()
    z = torch.randn(48, 2, dtype=torch.float64)
    model = _TwoInputs()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    ref = None
    for inputs in [(x, z), {"x": x, "z": z}]:
        for method in ["cached-graph", "forward-over-reverse"]:
            H = HessianOperator(model, "cross_entropy", [(inputs, y)], method=method)
            if ref is None:
                ref = dense_hessian(model, "cross_entropy", [(inputs, y)]) @ v
            torch.testing.assert_close(H @ v, ref, rtol=RTOL, atol=ATOL)


# -- batched products: op @ V in one pass per block ---------------------------------------------

@pytest.mark.parametrize("method", ["forward-over-reverse", "double-backward", "cached-graph"])
@pytest.mark.parametrize("case", ["mlp-ce", "tied-frozen-ce", "mlp-mse"])
def test_matmat_batched_equals_matvecs_and_dense(method, case):
    model, loss, data = CASES[case]()
    x, y = data
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]  # two weighted batches
    H = HessianOperator(model, loss, batches, method=method)
    n = H.shape[0]
    V = torch.randn(n, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    HV = H.matmat(V, block_size=3)  # blocks of 3, 3, 1
    assert getattr(H, "batched_fallback_reason", None) is None  # the batched path was used
    assert H.num_matvecs == 7
    stacked = torch.stack([H.matvec(V[:, j].contiguous()) for j in range(7)], 1)
    torch.testing.assert_close(HV, stacked, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(HV, _dense(case) @ V, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(H @ V, HV, rtol=1e-10, atol=1e-12)


def test_matmat_falls_back_to_the_loop_when_batching_fails(monkeypatch):
    model, loss, data = CASES["mlp-ce"]()
    H = HessianOperator(model, loss, data, method="forward-over-reverse")

    def fail(*a, **k):
        raise RuntimeError("vmap: not supported here")

    monkeypatch.setattr(H, "_block_product", fail)
    V = torch.randn(H.shape[0], 4, dtype=torch.float64)
    HV = H.matmat(V)
    assert "vmap" in H.batched_fallback_reason
    assert H.num_matvecs == 4
    torch.testing.assert_close(HV, _dense("mlp-ce") @ V, rtol=RTOL, atol=ATOL)


def test_matmat_rejects_a_bad_block_size():
    model, loss, data = CASES["mlp-ce"]()
    H = HessianOperator(model, loss, data)
    with pytest.raises(ValueError, match="block_size"):
        H.matmat(torch.zeros(H.shape[0], 2, dtype=torch.float64), block_size=0)


def test_default_block_size_is_memory_aware():
    from analysis.operators import BLOCK_BYTES, default_block_size
    assert default_block_size(1000, 8) == 16
    assert default_block_size(50_000_000, 4) == 1
    b = default_block_size(2_000_000, 8)
    assert 1 <= b < 16 and 4 * b * 2_000_000 * 8 <= BLOCK_BYTES
