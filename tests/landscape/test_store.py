"""GridStore: round trip, atomic writes, mismatch errors, directory stores, hashes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from landscape import store as store_mod
from landscape.store import (
    GridStore,
    StoreMismatchError,
    fingerprint_hash,
    tensor_hash,
    tensors_hash,
)

FP = {"kind": "test", "xs": [0.0, 1.0, 2.0], "model": "abc", "tuple": (1, 2)}


def _store(path, fp=FP, **kw):
    return GridStore(path, fp, [0.0, 1.0, 2.0], [-1.0, 1.0], ("loss", "accuracy"), **kw)


def test_round_trip_and_pending_rows(tmp_path):
    path = tmp_path / "sub" / "grid.npz"
    s = _store(path)
    assert s.pending_rows() == [0, 1, 2] and not path.exists()
    s.set_extra(loss_at_origin=0.25)
    s.write_row(1, {"loss": np.array([1.0, np.nan]), "accuracy": np.array([0.5, 0.75])})
    assert path.exists()
    t = _store(path, fp={**FP, "tuple": [1, 2]})  # tuples and lists compare equal (JSON)
    assert t.pending_rows() == [0, 2] and t.rows_done == 1 and not t.complete
    np.testing.assert_array_equal(t.values["loss"][1], [1.0, np.nan])
    np.testing.assert_array_equal(t.values["accuracy"][1], [0.5, 0.75])
    assert np.isnan(t.values["loss"][0]).all()
    assert t.extra["loss_at_origin"] == 0.25
    for i in (0, 2):
        t.write_row(i, {"loss": np.zeros(2), "accuracy": np.ones(2)})
    assert _store(path).complete
    # resume=False ignores the finished rows (they will be recomputed and replaced)
    assert _store(path, resume=False).pending_rows() == [0, 1, 2]
    # no temporary files left behind, and no lock file once the writers are closed
    s.close()
    t.close()
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.npz"]


def test_mismatch_names_the_differences_and_leaves_the_file(tmp_path):
    path = tmp_path / "grid.npz"
    _store(path).write_row(0, {"loss": np.ones(2), "accuracy": np.ones(2)})
    before = path.read_bytes()
    with pytest.raises(StoreMismatchError, match="model") as info:
        _store(path, fp={**FP, "model": "xyz"})
    assert "xs" not in str(info.value)
    with pytest.raises(StoreMismatchError, match="extra_key"):
        _store(path, fp={**FP, "extra_key": 1}, resume=False)
    assert path.read_bytes() == before


def test_write_is_atomic_when_saving_fails(tmp_path, monkeypatch):
    path = tmp_path / "grid.npz"
    s = _store(path)
    s.write_row(0, {"loss": np.ones(2), "accuracy": np.ones(2)})
    before = path.read_bytes()

    def broken(f, **arrays):
        f.write(b"partial garbage")
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod.np, "savez", broken)
    with pytest.raises(KeyboardInterrupt):
        s.write_row(1, {"loss": np.zeros(2), "accuracy": np.zeros(2)})
    assert path.read_bytes() == before
    s.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.npz"]


def test_not_a_store_and_bad_rows(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, a=np.ones(3))
    with pytest.raises(ValueError, match="not a landscape store"):
        _store(path)
    s = _store(tmp_path / "g.npz")
    with pytest.raises(ValueError, match="shape"):
        s.write_row(0, {"loss": np.ones(3), "accuracy": np.ones(3)})


def test_directory_store_and_suffix(tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    a = _store(folder)
    b = _store(folder, fp={**FP, "model": "other"})
    assert a.path.parent == folder and a.path != b.path
    assert a.path.name == f"landscape-{fingerprint_hash(FP)}.npz"
    c = _store(str(tmp_path / "new_dir") + "/")
    assert c.path.parent == tmp_path / "new_dir"
    d = _store(tmp_path / "plain")
    assert d.path.name == "plain.npz"


def test_hashes_are_exact():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert tensor_hash(t) == tensor_hash(t.clone())
    u = t.clone()
    u.view(-1)[4] = torch.nextafter(u.view(-1)[4], torch.tensor(100.0))  # one ulp
    assert tensor_hash(u) != tensor_hash(t)
    assert tensor_hash(t.double()) != tensor_hash(t)
    assert tensor_hash(t.reshape(3, 2)) != tensor_hash(t)
    assert tensor_hash(t.T) == tensor_hash(t.T.contiguous())  # values, not memory layout
    assert tensors_hash([t, t]) != tensors_hash([t])
    assert tensors_hash([(t, {"a": 1})]) == tensors_hash([(t.clone(), {"a": 1})])
    assert len(tensor_hash(torch.zeros(0))) == 16
    assert tensor_hash(torch.tensor([True, False])) != tensor_hash(torch.tensor([False, True]))
    assert tensor_hash(torch.ones(2, dtype=torch.bfloat16)) != tensor_hash(torch.ones(2, dtype=torch.float16))


def test_reader_only_store_adopts_rows_and_never_touches_disk(tmp_path):
    main = _store(tmp_path / "grid.npz")
    main.write_row(2, {"loss": np.array([3.0, 4.0]), "accuracy": np.array([0.1, 0.2])})
    follower = _store(tmp_path / "other_dir" / "grid.npz", writer=False)
    follower.adopt(main.state())
    assert follower.pending_rows() == [0, 1] and follower.path == main.path
    np.testing.assert_array_equal(follower.values["loss"][2], [3.0, 4.0])
    follower.write_row(0, {"loss": np.zeros(2), "accuracy": np.zeros(2)})
    assert not (tmp_path / "other_dir").exists()
    assert _store(tmp_path / "grid.npz").pending_rows() == [0, 1]  # rank 0's file unchanged


def test_store_file_gets_the_usual_mode_not_mkstemps_0600(tmp_path):
    import os

    import numpy as np

    from landscape.store import GridStore

    mask = os.umask(0o022)
    try:
        store = GridStore(tmp_path / "g.npz", {"a": 1}, np.linspace(-1, 1, 3),
                          np.linspace(-1, 1, 3), ("loss",))
        store.save()
        assert (os.stat(tmp_path / "g.npz").st_mode & 0o777) == 0o644
    finally:
        os.umask(mask)


# ---------------------------------------------------------------------------------------------
# damaged files (issue 15.9), stale temporaries and overwrite (15.8)


def _good(path):
    s = _store(path)
    s.write_row(0, {"loss": np.array([1.0, np.nan]), "accuracy": np.ones(2)})  # a NaN result
    s.write_row(1, {"loss": np.array([2.0, 3.0]), "accuracy": np.ones(2)})
    return path


def _rewrite(path, **changes):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    for k, v in changes.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    with open(path, "wb") as f:  # np.savez(path) would append .npz to names without it
        np.savez(f, **arrays)


def _damage_done_over_nan(path):
    with np.load(path) as z:
        loss = z["loss"].copy()
    loss[1, 0] = np.nan  # row 1 is done but this NaN was never computed
    _rewrite(path, loss=loss)


DAMAGES = {
    "truncated zip": lambda p: p.write_bytes(p.read_bytes()[:300]),
    "garbage bytes": lambda p: p.write_bytes(b"\x00\x01not a zip at all" * 10),
    "empty file": lambda p: p.write_bytes(b""),
    "object array (pickle)": lambda p: _rewrite(p, extra_obj=np.array([{"a": 1}], dtype=object)),
    "no done": lambda p: _rewrite(p, done=None),
    "done of floats": lambda p: _rewrite(p, done=np.array([1.0, 1.0, 0.0])),
    "done too short": lambda p: _rewrite(p, done=np.array([True, True])),
    "done over unrecorded NaN": _damage_done_over_nan,
    "no fingerprint": lambda p: _rewrite(p, fingerprint=None),
    "loss of ints": lambda p: _rewrite(p, loss=np.ones((3, 2), dtype=np.int64)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_store_is_one_corrupt_error_naming_the_file(tmp_path, damage):
    from landscape.store import StoreCorruptError

    path = _good(tmp_path / "grid.npz")
    DAMAGES[damage](path)
    before = path.read_bytes()
    with pytest.raises(StoreCorruptError) as info:
        _store(path)
    msg = str(info.value)
    assert isinstance(info.value, StoreMismatchError)  # old handlers still catch it
    assert str(path) in msg and "\n" not in msg
    assert "delete the file" in msg and "overwrite=True" in msg
    assert path.read_bytes() == before  # untouched
    # starting over is possible, and then the file is a valid store again
    s = _store(path, overwrite=True)
    assert s.pending_rows() == [0, 1, 2]
    s.write_row(2, {"loss": np.zeros(2), "accuracy": np.zeros(2)})
    assert _store(path).pending_rows() == [0, 1]


def test_recorded_nan_results_resume_without_error(tmp_path):
    path = _good(tmp_path / "grid.npz")
    t = _store(path)
    assert t.pending_rows() == [2]
    np.testing.assert_array_equal(t.values["loss"][0], [1.0, np.nan])


def test_another_grid_is_a_mismatch(tmp_path):
    path = _good(tmp_path / "grid.npz")
    with pytest.raises(StoreMismatchError, match="another grid"):
        GridStore(path, FP, [0.0, 1.0, 2.5], [-1.0, 1.0], ("loss", "accuracy"))


def test_stale_temporaries_removed_on_open(tmp_path):
    path = _good(tmp_path / "grid.npz")
    stale = [tmp_path / ".grid.npz.k1ll3d.tmp", tmp_path / "grid.npz.abc123.tmp"]  # new, legacy
    keep = [tmp_path / ".other.npz.x.tmp", tmp_path / "grid.npz.notes"]
    for p in stale + keep:
        p.write_bytes(b"partial")
    _store(path)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)
    # a reader-only store (non-zero ranks) touches nothing
    stale[0].write_bytes(b"partial")
    _store(path, writer=False)
    assert stale[0].exists()


def test_atomic_write_mode_cleanup_and_stale_names(tmp_path):
    import os

    from landscape._atomic import atomic_write, remove_stale_temporaries

    path = tmp_path / "sub" / "out.json"
    old = os.umask(0o027)
    try:
        with atomic_write(path) as f:
            f.write("{}")
    finally:
        os.umask(old)
    assert path.read_text() == "{}" and (path.stat().st_mode & 0o777) == 0o640
    for exc in (KeyboardInterrupt(), OSError(28, "No space left on device")):
        with pytest.raises(type(exc)):
            with atomic_write(path, "wb") as f:
                f.write(b"half")
                names = [p.name for p in path.parent.iterdir()]
                assert any(n.startswith(".out.json.") and n.endswith(".tmp") for n in names)
                raise exc
        assert path.read_text() == "{}"
        assert [p.name for p in path.parent.iterdir()] == ["out.json"]
    with pytest.raises(ValueError, match="'a'"):
        with atomic_write(path, "a"):
            pass
    (path.parent / ".out.json.zz.tmp").write_text("stale")
    assert [p.name for p in remove_stale_temporaries(path)] == [".out.json.zz.tmp"]
