"""analysis.distributed's agreement helpers on one process (their 2-rank behaviour is in
tests/distributed/test_rank_agreement.py): no-ops that change nothing, and a fingerprint that
tells weights apart."""

from __future__ import annotations

import pytest
import torch

from analysis.distributed import (
    RanksFailed,
    all_ranks_succeed,
    check_same_weights,
    torchrun_environment_complete,
    weights_fingerprint,
)
from tests.models import mlp

FULL = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}


def test_only_the_complete_torchrun_environment_counts():
    assert torchrun_environment_complete(FULL)
    for name in FULL:
        partial = {k: v for k, v in FULL.items() if k != name}
        assert not torchrun_environment_complete(partial), name
    assert not torchrun_environment_complete({"RANK": "1"})
    assert not torchrun_environment_complete({**FULL, "MASTER_ADDR": ""})


def test_on_one_process_the_block_error_propagates_unchanged():
    with all_ranks_succeed("step"):
        x = 1
    assert x == 1
    with pytest.raises(KeyError, match="mine"):
        with all_ranks_succeed("step"):
            raise KeyError("mine")
    check_same_weights(mlp())  # nothing to compare with


def test_ranks_failed_names_every_rank_and_message():
    e = RanksFailed("loading x", [(1, "OSError", "cannot read"), (3, "ValueError", "bad")])
    assert str(e) == ("loading x failed on ranks 1, 3: rank 1: OSError: cannot read; "
                      "rank 3: ValueError: bad")
    assert e.failures[0] == (1, "OSError", "cannot read") and e.step == "loading x"


def _naive_fingerprint(model):
    """The formula of weights_fingerprint written out with Python integers."""
    out = []
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    for t in tensors:
        bits = t.detach().reshape(-1).double().view(torch.int64).tolist()
        for k in range(4):
            chunks = [(b >> (16 * k)) & 0xFFFF for b in bits]
            out += [sum(chunks), sum(c * (1 + i % 997) for i, c in enumerate(chunks))]
    return out


def test_fingerprint_is_the_formula_and_tells_changes_apart():
    a, b = mlp(seed=0), mlp(seed=0)
    fa = weights_fingerprint(a)
    assert fa.dtype == torch.int64 and fa.shape == (8 * len(list(a.parameters())),)
    assert fa.tolist() == _naive_fingerprint(a)
    assert torch.equal(fa, weights_fingerprint(b))
    with torch.no_grad():  # a permutation: the plain sums stay, a weighted sum changes
        w = b[0].weight
        w.copy_(w.flip(1))
    fb = weights_fingerprint(b)
    assert torch.equal(fa[0:8:2], fb[0:8:2]) and not torch.equal(fa[1:8:2], fb[1:8:2])
    c = mlp(seed=0)
    with torch.no_grad():  # the last bit of one entry
        bias = c[2].bias
        bias[0] = torch.nextafter(bias[0], torch.tensor(1.0, dtype=bias.dtype))
    assert not torch.equal(fa, weights_fingerprint(c))


def test_fingerprint_counts_floating_buffers():
    m = torch.nn.BatchNorm1d(3).double()
    f0 = weights_fingerprint(m)
    m.running_mean += 1
    assert not torch.equal(f0, weights_fingerprint(m))


def test_fingerprint_in_slices_equals_one_pass(monkeypatch):
    import analysis.distributed as D

    m = mlp(d=40, hidden=30)
    whole = weights_fingerprint(m)
    monkeypatch.setattr(D, "FINGERPRINT_SLICE", 7)  # slices that split every tensor unevenly
    assert torch.equal(weights_fingerprint(m), whole)
    assert whole.tolist() == _naive_fingerprint(m)
