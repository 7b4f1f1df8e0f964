"""Safe checkpoint loading: formats, wrappers, prefixes, key reports, malicious pickles, MSAM."""

import json
import os
import pathlib
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from landscape.checkpoints import (
    CheckpointError,
    PerturbedCheckpointWarning,
    UnsafeCheckpointError,
    find_checkpoints,
    load_checkpoint,
)
from tests.models import cnn_bn, mlp


def _fresh(seed: int, factory=mlp):
    return factory(seed=seed)


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: sd, id="plain"),
        pytest.param(lambda sd: {"model": sd, "epoch": 3}, id="model"),
        pytest.param(lambda sd: {"state_dict": sd, "step": 10}, id="state_dict"),
        pytest.param(lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {}}, id="model_state_dict"),
        pytest.param(lambda sd: {f"module.{k}": v for k, v in sd.items()}, id="dataparallel"),
        pytest.param(lambda sd: {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}}, id="ddp+compile"),
    ],
)
def test_round_trip_layouts(tmp_path, wrap):
    src = _fresh(0, cnn_bn)
    path = tmp_path / "ck.pt"
    torch.save(wrap(src.state_dict()), path)
    dst = _fresh(1, cnn_bn)
    assert not _same(src, dst)
    ck = load_checkpoint(path, dst)
    assert _same(src, dst)
    assert ck.format == "torch" and not ck.perturbed
    assert not (ck.missing_keys or ck.unexpected_keys or ck.shape_mismatches)
    json.dumps(ck.to_dict())
    assert "Checkpoint(" in repr(ck) and "<table>" in ck._repr_html_()


def test_metadata_kept(tmp_path):
    src = _fresh(0)
    torch.save({"model": src.state_dict(), "epoch": 7}, tmp_path / "a.pth")
    ck = load_checkpoint(tmp_path / "a.pth")
    assert ck.metadata == {"epoch": 7}
    assert set(ck.state_dict) == set(src.state_dict())


def test_safetensors(tmp_path):
    src = _fresh(0)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "m.safetensors",
              metadata={"note": "hi"})
    dst = _fresh(1)
    ck = load_checkpoint(tmp_path / "m.safetensors", dst)
    assert _same(src, dst) and ck.format == "safetensors" and ck.metadata == {"note": "hi"}


def test_wrapped_model_keeps_prefix(tmp_path):
    src = nn.DataParallel(_fresh(0))
    torch.save(src.state_dict(), tmp_path / "dp.pt")
    dst = nn.DataParallel(_fresh(1))
    load_checkpoint(tmp_path / "dp.pt", dst)
    assert _same(src, dst)


def test_mismatches_listed_by_name(tmp_path):
    src = _fresh(0)
    sd = dict(src.state_dict())
    first = next(iter(sd))
    last = list(sd)[-1]
    sd["extra.weight"] = torch.zeros(2)
    del sd[last]
    sd[first] = torch.zeros(3, 3, dtype=sd[first].dtype)
    torch.save(sd, tmp_path / "bad.pt")
    dst = _fresh(1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "bad.pt", dst)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"missing keys: {last}" in msg
    assert "unexpected keys: extra.weight" in msg
    assert f"{first} (checkpoint [3, 3]" in msg
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())  # untouched
    ck = load_checkpoint(tmp_path / "bad.pt", dst, strict=False)
    assert ck.missing_keys == (last,) and ck.unexpected_keys == ("extra.weight",)
    assert ck.shape_mismatches[0][0] == first
    # the matching tensors were loaded, the others left alone
    for k, v in dst.state_dict().items():
        if k in (first, last):
            assert torch.equal(v, before[k])
        else:
            assert torch.equal(v, src.state_dict()[k])


class _Payload:
    """Unpickling this would create a file (the classic malicious-checkpoint payload)."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


class _OsPayload:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("payload", [_Payload, _OsPayload])
def test_malicious_pickle_refused_and_not_run(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": _fresh(0).state_dict(), "extra": payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path, _fresh(1))
    assert not marker.exists()
    msg = str(info.value)
    assert "\n" not in msg and "refused" in msg and "allow_pickle" in msg
    # the explicit opt-in does run it: that is exactly why it is not the default
    load_checkpoint(path, _fresh(1), allow_pickle=True)
    assert marker.exists()


def test_unreadable_and_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="directory"):
        load_checkpoint(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01nope")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors")
    torch.save({"epoch": 1, "lr": 0.1, "cfg": {"a": 1}}, tmp_path / "noweights.pt")
    with pytest.raises(CheckpointError, match="no model weights"):
        load_checkpoint(tmp_path / "noweights.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_checkpoint(tmp_path / "list.pt")


def test_find_checkpoints(tmp_path):
    (tmp_path / "b.pt").write_bytes(b"")
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in find_checkpoints([tmp_path])] == ["a.safetensors", "b.pt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints in directory"):
        find_checkpoints([empty])
    with pytest.raises(FileNotFoundError):
        find_checkpoints([tmp_path / "missing.pt"])


def test_no_warning_for_plain_checkpoint(tmp_path):
    torch.save({"model": _fresh(0).state_dict(), "optimizer": torch.optim.SGD(
        _fresh(0).parameters(), lr=0.1, momentum=0.9).state_dict()}, tmp_path / "sgd.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerturbedCheckpointWarning)
        ck = load_checkpoint(tmp_path / "sgd.pt", _fresh(1))
    assert not ck.perturbed and ck.optimizer_state is not None
