"""Issue 26 item 5: one lock protocol for stores, tested with two real processes.

Opening a store never deletes another process's in-flight temporary file; a second writer gets a
clear error naming the lock holder (or waits for it with ``lock_timeout``); finished rows never
regress."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from landscape.store import GridStore

ROOT = pathlib.Path(__file__).resolve().parents[2]

_OPEN = """
import sys, time, pathlib, numpy as np
from landscape.store import GridStore, StoreLockedError
path, ready, go = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
timeout = float(sys.argv[4])
def store():
    return GridStore(path, {"kind": "lock-test"}, [0.0, 1.0, 2.0, 3.0], [0.0, 1.0], ["loss"],
                     lock_timeout=timeout)
"""


def _script(body: str) -> str:
    return _OPEN + textwrap.dedent(body)


HOLDER = _script("""
    s = store()
    s.write_row(0, {"loss": np.zeros(2)})
    s.write_row(1, {"loss": np.ones(2)})
    ready.write_text("x")
    while not go.exists():
        time.sleep(0.02)
    s.write_row(2, {"loss": np.full(2, 2.0)})
    s.close()
""")

SECOND = _script("""
    try:
        s = store()
    except StoreLockedError as err:
        print("LOCKED", err)
        sys.exit(3)
    print("DONE", s.rows_done, s.pending_rows())
    s.write_row(s.pending_rows()[0], {"loss": np.full(2, 9.0)})
    s.close()
""")


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _start(script: str, tmp_path: pathlib.Path, timeout: str = "0") -> subprocess.Popen:
    args = [str(tmp_path / "grid.npz"), str(tmp_path / "ready"), str(tmp_path / "go"), timeout]
    return subprocess.Popen([sys.executable, "-c", script, *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: pathlib.Path, proc: subprocess.Popen, seconds: float = 60.0) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the holder exited early: {proc.communicate()}")
        assert time.monotonic() < end, "the holder did not get ready"
        time.sleep(0.02)


def test_second_writer_is_refused_naming_the_holder_and_in_flight_file_survives(tmp_path):
    path, ready, go = tmp_path / "grid.npz", tmp_path / "ready", tmp_path / "go"
    holder = _start(HOLDER, tmp_path)
    try:
        _wait_for(ready, holder)
        in_flight = tmp_path / ".grid.npz.abc123.tmp"  # the holder's next atomic write, mid-way
        in_flight.write_bytes(b"partial")
        out, err = _start(SECOND, tmp_path).communicate(timeout=120)
        assert "LOCKED" in out and f"process {holder.pid}" in out, out + err
        assert in_flight.exists()  # opening never deletes another process's temporary file
        in_flight.unlink()
    finally:
        go.write_text("x")
        out, err = holder.communicate(timeout=120)
    assert holder.returncode == 0, err
    s = GridStore(path, {"kind": "lock-test"}, [0.0, 1.0, 2.0, 3.0], [0.0, 1.0], ["loss"])
    assert s.pending_rows() == [3]  # the holder's rows are all there
    s.close()


def test_second_writer_waits_then_resumes_without_regressing_rows(tmp_path):
    path, ready, go = tmp_path / "grid.npz", tmp_path / "ready", tmp_path / "go"
    holder = _start(HOLDER, tmp_path)
    try:
        _wait_for(ready, holder)
        second = _start(SECOND, tmp_path, "120")
        time.sleep(1.0)  # the second writer is waiting for the lock now (or still starting)
        assert second.poll() is None
    finally:
        go.write_text("x")
        holder.communicate(timeout=120)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, out + err
    assert "DONE 3 [3]" in out  # it saw the holder's three finished rows after the wait
    s = GridStore(path, {"kind": "lock-test"}, [0.0, 1.0, 2.0, 3.0], [0.0, 1.0], ["loss"])
    assert s.complete
    np.testing.assert_array_equal(s.values["loss"][:, 0], [0.0, 1.0, 2.0, 9.0])
    s.close()


def test_a_killed_holder_leaves_no_lock_and_its_stale_temporaries_are_removed(tmp_path):
    path, ready = tmp_path / "grid.npz", tmp_path / "ready"
    holder = _start(HOLDER, tmp_path)
    _wait_for(ready, holder)
    stale = tmp_path / ".grid.npz.dead.tmp"
    stale.write_bytes(b"partial")
    holder.kill()
    holder.communicate(timeout=60)
    s = GridStore(path, {"kind": "lock-test"}, [0.0, 1.0, 2.0, 3.0], [0.0, 1.0], ["loss"])
    assert s.rows_done == 2 and not stale.exists()
    s.close()


def test_store_under_a_file_fails_when_opened_not_at_the_first_write(tmp_path):
    # any folder the lock file cannot be created in (read-only, under a file) takes this path;
    # a file as the parent fails also for root, whom a read-only folder does not stop
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError, match="afile"):
        GridStore(tmp_path / "afile" / "g.npz", {"kind": "x"}, [0.0], [0.0], ["loss"])


def test_same_process_reopen_and_close_is_idempotent(tmp_path):
    a = GridStore(tmp_path / "g.npz", {"kind": "x"}, [0.0, 1.0], [0.0], ["loss"])
    a.write_row(0, {"loss": np.zeros(1)})
    b = GridStore(tmp_path / "g.npz", {"kind": "x"}, [0.0, 1.0], [0.0], ["loss"])
    assert b.rows_done == 1
    a.close()
    a.close()
    with GridStore(tmp_path / "g.npz", {"kind": "x"}, [0.0, 1.0], [0.0], ["loss"]) as c:
        c.write_row(1, {"loss": np.ones(1)})
    b.close()
    with pytest.raises(ValueError, match="closed"):
        b.write_row(1, {"loss": np.ones(1)})


def test_slice_2d_releases_the_store_lock_also_after_an_interrupt(tmp_path):
    import torch

    from landscape import slice_2d
    from tests.models import classification_data, mlp

    model = mlp(seed=0)
    x, y = classification_data(seed=0)
    d = [torch.randn_like(p) for p in model.parameters()], [torch.randn_like(p) for p in model.parameters()]
    calls = {"n": 0, "fail_at": 5}  # checks and origin (2 calls), row 0 (2), Ctrl-C in row 1

    def loss(out, target):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise KeyboardInterrupt
        return torch.nn.functional.cross_entropy(out, target)

    with pytest.raises(KeyboardInterrupt):
        slice_2d(model, loss, (x, y), *d, xs=[0.0, 1.0, 2.0], ys=[0.0, 1.0], store=tmp_path / "g.npz",
                 progress=False)
    assert not (tmp_path / "g.npz.lock").exists()
    calls["fail_at"] = -1
    out = slice_2d(model, loss, (x, y), *d, xs=[0.0, 1.0, 2.0],
                   ys=[0.0, 1.0], store=tmp_path / "g.npz", progress=False)
    assert out.resumed_rows >= 1 and not (tmp_path / "g.npz.lock").exists()


def test_two_stores_of_one_process_never_regress_each_others_rows(tmp_path):
    args = ({"kind": "x"}, [0.0, 1.0, 2.0], [0.0], ["loss"])
    a = GridStore(tmp_path / "g.npz", *args)
    b = GridStore(tmp_path / "g.npz", *args)  # opened before a wrote anything
    a.write_row(0, {"loss": np.zeros(1)})
    b.write_row(1, {"loss": np.ones(1)})  # must not drop a's row 0
    a.write_row(2, {"loss": np.full(1, 2.0)})  # must not drop b's row 1
    a.close()
    b.close()
    with GridStore(tmp_path / "g.npz", *args) as c:
        assert c.complete
        np.testing.assert_array_equal(c.values["loss"][:, 0], [0.0, 1.0, 2.0])
    with GridStore(tmp_path / "g.npz", *args, resume=False) as d:  # recompute: no merge
        d.write_row(0, {"loss": np.full(1, 5.0)})
    with GridStore(tmp_path / "g.npz", *args) as e:
        assert e.pending_rows() == [1, 2]


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "5", True])
def test_bad_lock_timeout_is_refused_before_anything(tmp_path, bad):
    with pytest.raises(ValueError, match="lock_timeout must be a finite number"):
        GridStore(tmp_path / "sub" / "g.npz", {"kind": "x"}, [0.0], [0.0], ["loss"], lock_timeout=bad)
    assert not (tmp_path / "sub").exists()
