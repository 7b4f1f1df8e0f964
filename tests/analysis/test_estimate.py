"""The peak-memory estimate before a run (:mod:`analysis.operators.estimate`): its parts against
hand counts (the validation against a measured peak RSS on GPT-2 small is
``benchmarks/llm_scale.py``)."""

from __future__ import annotations

import pytest

from analysis.operators.estimate import estimate_peak_bytes
from tests.models import classification_data, mlp


def test_the_parts_are_the_hand_counts():
    model, data = mlp(), classification_data()  # 53 float64 parameters, 48 samples
    n, s = 53, 8
    e = estimate_peak_bytes(model, "cross_entropy", data, method="finite-difference",
                            max_basis=4)
    # saved for backward: tanh's output (48 x 5), log-softmax (48 x 3), nll's total weight
    assert e.activation_bytes == 48 * 5 * 8 + 48 * 3 * 8 + 8
    assert e.product_bytes == e.activation_bytes + 3 * n * s
    assert e.vectors_bytes == (4 + 3) * n * s  # top_eigenpairs' documented bound
    assert e.peak_bytes == e.baseline_bytes + e.vectors_bytes + e.product_bytes
    assert e.validated and e.to_dict()["method"] == "finite-difference"
    auto = estimate_peak_bytes(model, "cross_entropy", data, batch_size=16)
    # the cached graph of all 3 batches: 3 x (3 x the first batch's activations)
    assert auto.method == "cached-graph" and not auto.validated
    assert auto.product_bytes == 3 * 3 * auto.activation_bytes + 2 * n * s
    assert auto.vectors_bytes == (20 + 3) * n * s
    trace = estimate_peak_bytes(model, "cross_entropy", data, analysis="trace", num_matvecs=30,
                                method="double-backward")
    assert trace.vectors_bytes == (10 + 4) * n * s
    with pytest.raises(ValueError, match="analysis must be 'lanczos' or 'trace', got 'slq'"):
        estimate_peak_bytes(model, "cross_entropy", data, analysis="slq")
