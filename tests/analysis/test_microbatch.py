"""``microbatch_size=``: every batch split into slices for the products, weighted by their own
loss terms, so that the products are those of whole batches (float64, ``rtol 1e-10``) and every
forward pass sees at most one slice.

References: the same operator on whole batches, and dense float64 Hessians / GGNs
(:func:`analysis.reference.dense_hessian`, :func:`analysis.reference.dense_ggn`).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from analysis import GGNOperator, HessianOperator, top_eigenpairs
from analysis.data import microbatches
from analysis.reference import dense_ggn, dense_hessian
from tests.lm_models import lm_model, padded_batches, token_sequences
from tests.models import classification_data, mlp

METHODS = ["auto", "forward-over-reverse", "double-backward", "finite-difference"]


class _Widest(torch.nn.Module):
    """Records the largest number of samples one forward pass sees."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.widest = inner, 0

    def forward(self, *args, **kwargs):
        first = args[0] if args else kwargs["input_ids"]
        self.widest = max(self.widest, int(first.shape[0]))
        return self.inner(*args, **kwargs)


def _mlp_case():
    x, y = classification_data()
    return _Widest(mlp()), "cross_entropy", {"data": (x, y), "batch_size": 20}


def _lm_case():
    # right-padded token batches of uneven lengths: the slices hold different token counts
    return (_Widest(lm_model()), "lm",
            {"data": padded_batches(token_sequences((5, 2, 4, 3, 5, 2, 4)), sizes=(3, 4))})


def _loader_case():
    x, y = classification_data()
    return _Widest(mlp()), "cross_entropy", {"data": DataLoader(TensorDataset(x, y), batch_size=20)}


CASES = {"mlp": _mlp_case, "causal-lm-padded": _lm_case, "loader": _loader_case}


def _kwargs(case):
    kw = dict(case)
    data = kw.pop("data")
    return data, kw


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_microbatched_products_equal_whole_batches(case, method):
    model, loss, spec = CASES[case]()
    data, kw = _kwargs(spec)
    whole = HessianOperator(model, loss, data, method=method, **kw)
    v = torch.randn(whole.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = whole @ v
    if case != "loader":
        dense = dense_hessian(model, loss, data, **kw) @ v
        rtol = 1e-6 if method == "finite-difference" else 1e-8
        torch.testing.assert_close(ref, dense, rtol=rtol, atol=1e-9)
    model.widest = 0
    for mb in (1, 3):
        H = HessianOperator(model, loss, data, method=method, microbatch_size=mb, **kw)
        model.widest = 0
        hv = H @ v
        assert model.widest <= mb  # every forward pass sees one slice at most
        # finite differences: the same step h, so the same difference up to its rounding / h
        torch.testing.assert_close(hv, ref, rtol=1e-10 if method != "finite-difference" else 1e-7,
                                   atol=1e-12 if method != "finite-difference" else 1e-9)
        torch.testing.assert_close(H.gradient(), whole.gradient(), rtol=1e-10, atol=1e-13)
        if method == "auto":
            assert H.method != "cached-graph"
            assert "microbatch_size" in H.auto_choice.skipped["cached-graph"] or case == "loader"


def test_microbatched_ggn_and_eigenvalues_equal_the_dense_references():
    model, loss, spec = _lm_case()
    data = spec["data"]
    G = GGNOperator(model, loss, data, microbatch_size=2)
    v = torch.randn(G.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(G @ v, dense_ggn(model, loss, data) @ v, rtol=1e-10, atol=1e-12)
    A = dense_hessian(model, loss, data)
    res = top_eigenpairs(model, loss, data, k=1, tol=1e-8, microbatch_size=2)
    assert float(res.eigenvalues[0]) == pytest.approx(float(torch.linalg.eigvalsh(A)[-1]),
                                                      rel=1e-7)
    block = HessianOperator(model, loss, data, microbatch_size=2,
                            method="double-backward").restricted(["inner.proj.weight"])
    assert block.microbatch_size == 2


def test_microbatches_keep_a_batch_dict_its_own_target_and_count_samples():
    batch = padded_batches(token_sequences())[1]  # 3 sequences
    parts = list(microbatches(batch, batch, 3, 2))
    assert [p[2] for p in parts] == [2, 1]
    assert all(p[1] is p[0] for p in parts)
    torch.testing.assert_close(torch.cat([p[0]["input_ids"] for p in parts]), batch["input_ids"])
    assert list(microbatches(batch, batch, 3, None))[0][0] is batch


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_a_bad_microbatch_size_is_refused_naming_it(bad):
    model, loss, spec = _mlp_case()
    with pytest.raises(ValueError, match=f"microbatch_size must be a positive integer or None, "
                                         f"got {bad!r}"):
        HessianOperator(model, loss, spec["data"], microbatch_size=bad)


def test_the_cached_graph_is_refused_with_microbatches():
    model, loss, spec = _mlp_case()
    with pytest.raises(ValueError, match="method='cached-graph' keeps the graph of every batch"):
        HessianOperator(model, loss, spec["data"], method="cached-graph", microbatch_size=4)
