"""Process-group life cycle, collectives helpers and failure behaviour (analysis.distributed)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
import torch

from analysis import distributed as D
from tests.distributed import workers
from tests.distributed.launcher import run_ranks

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------- one process


def test_single_process_is_a_no_op(no_torchrun):
    assert not D.launched_by_torchrun()
    assert D.init_from_env() is False
    assert not torch.distributed.is_initialized()
    with D.distributed_session() as active:
        assert active is False
        assert (D.get_rank(), D.get_world_size(), D.is_main_process()) == (0, 1, True)
        x = torch.tensor([2.0])
        assert D.all_reduce_sum(x) is x and x.item() == 2.0
        assert D.broadcast_object({"a": 1}) == {"a": 1}
        assert D.all_gather_object(3) == [3]
        D.barrier()
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.tensor([1.0, 3.0])
        D.all_reduce_gradients([p])
        assert p.grad.tolist() == [1.0, 3.0]
        D.assert_same_across_ranks(torch.randn(3))
    D.shutdown()  # nothing to destroy
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    "env, match",
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "MASTER_PORT"),
    ],
    ids=["non-integer-rank", "rank-out-of-range", "no-master-addr", "no-master-port"],
)
def test_bad_torchrun_environment_is_a_clear_error(no_torchrun, monkeypatch, env, match):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        D.init_from_env()
    assert not torch.distributed.is_initialized()


def test_bad_backend_and_timeout(no_torchrun, monkeypatch):
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="'tcp'"):
        D.init_from_env(backend="tcp")
    with pytest.raises(ValueError, match="positive"):
        D.init_from_env(timeout=0)
    with pytest.raises(TypeError, match="str"):
        D.init_from_env(timeout="60")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="nccl"):
            D.init_from_env(backend="nccl")
    assert not torch.distributed.is_initialized()
    assert D._as_timedelta(1.5) == timedelta(seconds=1.5)
    assert D._as_timedelta(None) == D.DEFAULT_TIMEOUT


def test_default_device_follows_cuda(no_torchrun):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert D.default_device().type == expected


# --------------------------------------------------------------------------- two processes


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_torchrun_environment_session():
    out = run_ranks(workers.torchrun_session, 2, torchrun_env=True)
    for rank, o in enumerate(out):
        v = o.value
        assert v["inside"] == (True, True, rank, 2, rank == 0)
        assert v["sum"] == 3.0
        assert v["obj"] == {"from": 0, "payload": [1, 2]}
        assert v["gathered"] == [0, 10]
        assert v["differs"] is not None and "differs across ranks" in v["differs"]
        assert v["grads"] == ([1.5, 1.5, 1.5], [3.0, 3.0])
        assert v["after"] is False  # the session destroyed the group it created


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_rank_that_raises_does_not_hang_the_others():
    out = run_ranks(workers.raise_on_rank_one, 2, collective_timeout=4, deadline=60,
                    check=False)
    assert "deliberate failure on rank 1" in out[1].error
    # rank 0 fails (peer gone or timeout) instead of waiting forever
    assert out[0].error is not None, out[0]
    assert out[0].seconds < 20


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_silent_rank_makes_the_others_time_out():
    out = run_ranks(workers.stall_on_rank_one, 2, (6.0,), collective_timeout=1.5, deadline=60,
                    check=False)
    assert out[1].error is None and out[1].value == 6.0
    assert out[0].error is not None and "rank 0 gave up" in out[0].error, out[0]
    # the 1.5 s collective timeout fired, before the silent rank came back (6 s)
    waited = float(re.search(r"gave up after ([0-9.]+) s", out[0].error).group(1))
    assert waited < 5.5, out[0].error
