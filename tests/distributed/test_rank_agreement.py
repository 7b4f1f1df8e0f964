"""Ranks that agree and failures that surface, on 2 gloo ranks (issue 24, items 3 and 4).

* method="auto": rank 0 alone times the methods and every rank uses its choice (before, each
  rank timed on its own data: different forward counts and possibly different methods);
* ``landscape hessian`` under a torchrun environment, with a command line per rank so that
  rank 1 alone reads another or a bad file: the weights' fingerprints are compared (other
  weights on rank 1 are refused, naming it); data whose size differs across ranks is refused;
  each rank's share of the data is reported; bad data, an unreadable checkpoint and a refused
  pickle on rank 1 show their cause on the console, every rank exits non-zero, in seconds.

The console is the ranks' stderr (captured per rank). Before this, rank 1 printed nothing and
rank 0 only gloo's "Connection closed by peer".
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import agreement_workers as A
from tests.distributed.launcher import check_values, run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SPEC = ["--model", "tests.distributed.agreement_workers:build", "--batch-size", "8",
        "--dtype", "float64", "--top-k", "2", "--tol", "1e-6"]
DATA = "tests.distributed.agreement_workers:data"
BOUND_S = 30.0  # every rank is back well within this (the collective timeout is 10 minutes)


# --------------------------------------------------------------------------- method="auto"


@pytest.fixture(scope="module")
def auto():
    return [o.value for o in run_ranks(A.auto_checks, 2, deadline=100)]


def test_auto_is_decided_on_rank_0_and_used_by_every_rank(auto):
    r0, r1 = check_values(auto, "agreed")
    assert r0["method"] == r1["method"]
    assert r0["timings"] == r1["timings"]  # rank 0's timings, broadcast
    assert r0["forwards"] > 0 and r1["forwards"] == 0  # rank 1 did no calibration work
    torch.testing.assert_close(r0["hv"], r1["hv"], rtol=1e-12, atol=1e-14)  # same product


def test_a_calibration_failure_on_rank_0_fails_every_rank(auto):
    r0, r1 = check_values(auto, "failing_on_rank0")
    assert "deliberate calibration failure on rank 0" in r0
    assert "calibration failed on rank 0" in r1 and "deliberate" in r1


# --------------------------------------------------------------------------- the CLI


class NotAllowed:
    """A class a weights_only unpickler refuses."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("agree")
    model = A.build()
    torch.save(model.state_dict(), d / "a.pt")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    torch.save(model.state_dict(), d / "b.pt")  # same keys and shapes, other weights
    (d / "truncated.pt").write_bytes((d / "a.pt").read_bytes()[:300])
    torch.save({"model": A.build().state_dict(), "extra": NotAllowed()}, d / "pickle.pt")
    return d


def _run(files, ckpt0, ckpt1, data0=DATA, data1=DATA, extra=("--quiet",)):
    argvs = [["hessian", str(files / ckpt), *SPEC, "--data", data, *extra]
             for ckpt, data in ((ckpt0, data0), (ckpt1, data1))]
    out = run_ranks(A.cli_run, 2, (argvs,), torchrun_env=True, deadline=90, check=False)
    for o in out:
        assert o.error is None, f"rank {o.rank} did not return:\n{o.error}"
        assert o.value["seconds"] < BOUND_S, o.value
        assert not o.value["initialized_after"]  # the group was shut down
    return [o.value for o in out]


def test_other_weights_on_rank_1_are_refused_naming_it(files):
    r0, r1 = _run(files, "a.pt", "b.pt")
    assert (r0["code"], r1["code"]) == (1, 1)
    for r, v in enumerate((r0, r1)):
        assert f"rank {r}: " in v["stderr"]
        assert "differ across ranks: rank 1 has other weights than rank 0" in v["stderr"]
    assert r0["stdout"] == r1["stdout"] == ""  # no eigenvalues of neither file


@pytest.mark.parametrize("ckpt1, cause", [
    ("truncated.pt", "truncated"),
    ("pickle.pt", "refused to load"),
    ("missing.pt", "missing.pt"),
], ids=["unreadable", "refused-pickle", "missing"])
def test_a_checkpoint_rank_1_cannot_use_shows_its_cause(files, ckpt1, cause):
    r0, r1 = _run(files, "a.pt", ckpt1)
    assert (r0["code"], r1["code"]) != (0, 0) and r0["code"] != 0 and r1["code"] != 0
    # rank 0 reports the failure it collected, naming rank 1 and its cause
    line = r0["stderr"]
    assert "failed on rank 1: rank 1: " in line and cause in line and ckpt1 in line, line
    assert r1["stderr"] == ""  # said once, by rank 0


def test_bad_data_on_rank_1_shows_its_cause(files):
    r0, r1 = _run(files, "a.pt", "a.pt", data1="tests.distributed.agreement_workers:"
                  "data_raising_on_rank1")
    assert r0["code"] == 1 and r1["code"] == 1
    assert "failed on rank 1: rank 1: " in r0["stderr"]
    assert "unreadable on rank 1" in r0["stderr"]


def test_a_failure_in_the_middle_of_the_run_on_rank_1_shows_its_cause(files):
    bad = "tests.distributed.agreement_workers:data_bad_labels_on_rank1"
    r0, r1 = _run(files, "a.pt", "a.pt", data0=bad, data1=bad)
    assert r0["code"] == 1 and r1["code"] == 1
    assert "rank 1: " in r1["stderr"] and "got 7" in r1["stderr"], r1["stderr"]
    assert "rank 0: " in r0["stderr"]  # rank 0 stopped too (its collective lost the peer)


def test_data_of_different_sizes_is_refused_and_shares_are_reported(files):
    small = "tests.distributed.agreement_workers:data_smaller_on_rank1"
    r0, r1 = _run(files, "a.pt", "a.pt", data0=small, data1=small)
    assert r0["code"] == r1["code"] == 1
    assert "--data differs across ranks (rank 0: 50, rank 1: 40 samples)" in r0["stderr"]
    r0, r1 = _run(files, "a.pt", "a.pt", extra=())
    assert r0["code"] == r1["code"] == 0, (r0, r1)
    assert "data: 50 samples on 2 ranks (per rank: 26, 24)" in r0["stderr"]
    assert r1["stderr"] == ""


def test_under_real_torchrun_the_cause_reaches_the_console_and_the_exit_code(files):
    """The whole path: torchrun starts 2 processes of ``python -m landscape``; rank 1's data
    fails; torchrun's console shows the cause and torchrun exits non-zero, in seconds."""
    import os
    import subprocess
    import sys
    import time

    from analysis.distributed import find_free_port

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(find_free_port()), "-m", "landscape", "hessian",
           str(files / "a.pt"), *SPEC, "--quiet",
           "--data", "tests.distributed.agreement_workers:data_raising_on_rank1"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env)
    seconds = time.perf_counter() - t0
    console = proc.stdout + proc.stderr
    assert proc.returncode != 0, console
    assert "failed on rank 1: rank 1: " in console, console
    assert "raised OSError: deliberate: /data/shard.npz is unreadable on rank 1" in console
    assert seconds < 60, seconds
