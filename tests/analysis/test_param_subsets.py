"""Hessian blocks of parameter subsets chosen by names, a regex or modules: vectors of the
subset's size, every product method against the dense float64 Hessian's diagonal block."""

from __future__ import annotations

import re

import pytest
import torch

from analysis import HessianOperator, ParameterSpace
from analysis.reference import dense_hessian
from tests.lm_models import lm_model, padded_batches, token_sequences

METHODS = ["auto", "forward-over-reverse", "double-backward", "finite-difference"]


def _block(model, names):
    """Rows/columns of ``names`` in the dense Hessian of every parameter."""
    space = ParameterSpace(model)
    idx, start = [], 0
    for n, k in zip(space.names, space.numels):
        if n in names:
            idx.extend(range(start, start + k))
        start += k
    return torch.tensor(idx)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("how", ["names", "regex", "modules"])
def test_subset_products_are_the_dense_diagonal_block(how, method):
    model = lm_model()
    data = padded_batches(token_sequences())
    names = ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    params = {"names": names, "regex": re.compile(r"^mlp\."), "modules": [model.mlp]}[how]
    H = HessianOperator(model, "lm", data, params=params, method=method)
    assert H.space.names == names and H.shape == (40, 40)  # vectors of the subset's size
    idx = _block(model, names)
    A = dense_hessian(model, "lm", data)[idx][:, idx]
    v = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rtol = 1e-6 if method == "finite-difference" else 1e-9
    torch.testing.assert_close(H @ v, A @ v, rtol=rtol, atol=1e-10)


def test_bad_selections_name_the_problem():
    model = lm_model()
    with pytest.raises(ValueError, match="the pattern 'nothing' matches no trainable parameter"):
        ParameterSpace(model, re.compile("nothing"))
    with pytest.raises(TypeError, match=r"or a compiled regex \(re.compile\), got the string"):
        ParameterSpace(model, "mlp")
    with pytest.raises(ValueError, match="holds no trainable parameter"):
        ParameterSpace(model, [torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="names the same parameter twice"):
        ParameterSpace(model, [model.mlp, "mlp.0.bias"])
