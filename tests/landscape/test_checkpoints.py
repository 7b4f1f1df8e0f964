"""Safe checkpoint loading: formats, wrappers, prefixes, key reports, malicious pickles, MSAM."""

import json
import os
import pathlib
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from landscape import CheckpointError, find_checkpoints, load_checkpoint
from landscape.checkpoints import PerturbedCheckpointWarning, UnsafeCheckpointError
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
    with pytest.raises(CheckpointError, match="directory without model weights"):
        load_checkpoint(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint: it looks like text"):
        load_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "bin.pt").write_bytes(b"\x00\x01\x02\xfe\xff" * 4)
    with pytest.raises(CheckpointError, match="unrecognized binary data"):
        load_checkpoint(tmp_path / "bin.pt")
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


# --------------------------------------------------------------------------------------------
# MSAM: a checkpoint saved mid-training at the perturbed point w~


def _msam_run(opt_factory, steps=5, seed=0, factory=cnn_bn):
    from tests.models import classification_data, image_data

    model = factory(seed=seed)
    x, y = image_data(seed=seed) if factory is cnn_bn else classification_data(seed=seed)
    opt = opt_factory(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def _msam(params):
    from msam import MSAM

    return MSAM(params, lr=0.05, momentum=0.9, rho=0.7)


def _adamw_msam(params):
    from msam import AdamWMSAM

    return AdamWMSAM(params, lr=1e-2, rho=0.5)


@pytest.mark.parametrize("opt_factory", [_msam, _adamw_msam], ids=["MSAM", "AdamWMSAM"])
@pytest.mark.parametrize("with_model", [True, False], ids=["into-model", "no-model"])
def test_perturbed_msam_checkpoint_moved_back(tmp_path, opt_factory, with_model):
    model, opt = _msam_run(opt_factory)
    assert opt.is_perturbed
    path = tmp_path / "mid.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 5}, path)
    perturbed = {k: v.clone() for k, v in model.state_dict().items()}

    # independent reference 1: the hand formula w = w~ + rho * d / ||d|| (global norm)
    key = "momentum_buffer" if "momentum_buffer" in next(iter(opt.state.values())) else "exp_avg"
    names = [n for n, _ in model.named_parameters()]
    bufs = {n: opt.state[p][key] for n, p in model.named_parameters()}
    norm = torch.sqrt(sum(b.pow(2).sum() for b in bufs.values()))
    rho = opt.param_groups[0]["rho"]
    by_hand = {n: perturbed[n] + rho * bufs[n] / norm for n in names}
    # independent reference 2: the optimizer's own eval()
    opt.eval()
    truth = {k: v.clone() for k, v in model.state_dict().items()}
    for n in names:
        torch.testing.assert_close(by_hand[n], truth[n], rtol=1e-12, atol=1e-12)
    shift = torch.sqrt(sum((perturbed[n] - truth[n]).pow(2).sum() for n in names))
    torch.testing.assert_close(shift, torch.tensor(abs(rho), dtype=shift.dtype))  # ||eps|| = rho

    target = cnn_bn(seed=9) if with_model else None
    with pytest.warns(PerturbedCheckpointWarning, match="perturbed"):
        ck = load_checkpoint(path, target)
    assert ck.perturbed and ck.unperturbed and ck.metadata == {"step": 5}
    loaded = target.state_dict() if with_model else ck.state_dict
    for k in truth:
        torch.testing.assert_close(loaded[k], truth[k], rtol=1e-12, atol=1e-12)

    raw = load_checkpoint(path, unperturb=False)
    assert raw.perturbed and not raw.unperturbed
    for k in perturbed:
        assert torch.equal(raw.state_dict[k], perturbed[k])


def test_msam_uses_stored_coefficient_after_rho_change(tmp_path):
    """A rho changed after the last step must not leak into the move-back (the paper's code
    moves back with the current rho and leaves (rho_new - rho_old) v/||v|| in the weights)."""
    model, opt = _msam_run(_msam)
    for g in opt.param_groups:
        g["rho"] = 2.5
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "m.pt")
    opt.eval()
    with pytest.warns(PerturbedCheckpointWarning):
        ck = load_checkpoint(tmp_path / "m.pt")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ck.state_dict[k], v, rtol=1e-12, atol=1e-12)


def test_msam_saved_after_eval_is_not_touched(tmp_path):
    model, opt = _msam_run(_msam)
    opt.eval()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "e.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerturbedCheckpointWarning)
        ck = load_checkpoint(tmp_path / "e.pt")
    assert not ck.perturbed
    for k, v in model.state_dict().items():
        assert torch.equal(ck.state_dict[k], v)


def test_msam_state_that_does_not_match_is_refused(tmp_path):
    model, opt = _msam_run(_msam)
    sd = opt.state_dict()
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    torch.save({"model": model.state_dict(), "optimizer": sd}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="cannot match the optimizer state"):
        load_checkpoint(tmp_path / "x.pt", cnn_bn(seed=1))


def _two_layer(seed=0, **_):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4)).double()


def _run_groups(groups_of, steps=3):
    from msam import MSAM

    model = _two_layer()
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(1))
    opt = MSAM(groups_of(model), lr=0.1, momentum=0.9, rho=1.0)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def test_groups_in_another_order_with_equal_shapes_are_refused_not_guessed(tmp_path):
    # groups list the last layer first; both layers have the same shapes: a positional match
    # would add the wrong momentum silently
    model, opt = _run_groups(lambda m: [{"params": list(m[2].parameters())},
                                        {"params": list(m[0].parameters())}])
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="parameter groups"):
        load_checkpoint(tmp_path / "g.pt", _two_layer(seed=3))


def test_groups_with_recorded_names_are_matched_by_name(tmp_path):
    model, opt = _run_groups(lambda m: [{"params": list(m[2].named_parameters())},
                                        {"params": list(m[0].named_parameters())}])
    sd = opt.state_dict()
    if "param_names" not in sd["param_groups"][0]:
        pytest.skip("this torch does not record param_names in optimizer state dicts")
    # the names recorded per group are the sub-module's ('weight', 'bias'): make them the model's
    sd["param_groups"][0]["param_names"] = ["2.weight", "2.bias"]
    sd["param_groups"][1]["param_names"] = ["0.weight", "0.bias"]
    torch.save({"model": model.state_dict(), "optimizer": sd}, tmp_path / "n.pt")
    opt.eval()
    with pytest.warns(PerturbedCheckpointWarning):
        ck = load_checkpoint(tmp_path / "n.pt")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ck.state_dict[k], v, rtol=1e-12, atol=1e-12)


def test_groups_with_unique_shapes_are_matched_by_shape(tmp_path):
    # decay / no-decay split: weights first, then biases (not named_parameters order)
    def groups(m):
        m[2] = torch.nn.Linear(4, 3).double()  # shapes now all distinct
        return [{"params": [m[0].weight, m[2].weight]}, {"params": [m[0].bias, m[2].bias],
                                                         "weight_decay": 0.0}]

    model, opt = _run_groups(groups)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "u.pt")
    opt.eval()
    with pytest.warns(PerturbedCheckpointWarning):
        ck = load_checkpoint(tmp_path / "u.pt")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ck.state_dict[k], v, rtol=1e-12, atol=1e-12)


def test_sam_saved_between_its_two_passes_is_refused(tmp_path):
    from msam import SAM

    model = _two_layer()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    x = torch.randn(8, 4, dtype=torch.float64)
    torch.nn.functional.mse_loss(model(x), x).backward()
    opt.first_step(zero_grad=True)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match="first_step"):
        load_checkpoint(tmp_path / "s.pt")


# --------------------------------------------------------------------------------------------
# files as they come: FIFOs, formats by content, CRCs, zero matches, optimizer entries


def test_dangling_symlink_refused(tmp_path):
    """(FIFOs: tests/reliability/test_checkpoint_corpus.py, with a timeout.)"""
    link = tmp_path / "dangling.pt"
    link.symlink_to(tmp_path / "gone.pt")
    with pytest.raises(CheckpointError, match="dangling symlink"):
        load_checkpoint(link)


@pytest.mark.parametrize(
    ("content", "looks"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(40), "a PNG image"),
        (b'{"weights": [1, 2, 3]}', "JSON"),
        (b"  [1, 2]", "JSON"),
        (b"hello\n", "text"),
        (b"\x1f\x8b\x08\x00" + bytes(20), "gzip data"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n", "a Git LFS pointer"),
    ],
)
def test_non_checkpoint_content_named_pt_is_not_called_a_pickle(tmp_path, content, looks):
    path = tmp_path / "ck.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, _fresh(0))
    msg = str(info.value)
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert f"{path} is not a checkpoint: it looks like {looks}" in msg
    assert "pickle" not in msg.replace("(zip or pickle)", "")


def test_formats_by_content_whatever_the_suffix(tmp_path):
    src = _fresh(0)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, tmp_path / "a.pt")
    torch.save(sd, tmp_path / "b.safetensors")
    torch.save(sd, tmp_path / "c.bin", _use_new_zipfile_serialization=False)
    (tmp_path / "d.weights").write_bytes((tmp_path / "a.pt").read_bytes())
    for name, fmt in [("a.pt", "safetensors"), ("b.safetensors", "torch"), ("c.bin", "torch"),
                      ("d.weights", "safetensors")]:
        dst = _fresh(1)
        ck = load_checkpoint(tmp_path / name, dst)
        assert ck.format == fmt and _same(src, dst), name


def _member_data_offset(blob: bytes, member: str) -> int:
    import io
    import struct
    import zipfile

    info = zipfile.ZipFile(io.BytesIO(blob)).getinfo(member)
    n, e = struct.unpack("<HH", blob[info.header_offset + 26: info.header_offset + 30])
    return info.header_offset + 30 + n + e


def test_bit_flip_in_a_tensor_is_caught(tmp_path):
    import zipfile

    path = tmp_path / "ck.pt"
    torch.save(_fresh(0).state_dict(), path)
    blob = bytearray(path.read_bytes())
    member = next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("data/0"))
    blob[_member_data_offset(bytes(blob), member) + 3] ^= 0x01
    path.write_bytes(bytes(blob))
    torch.load(path, weights_only=True)  # torch itself does not notice
    dst = _fresh(1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"ck\.pt is corrupt: member '{member}' fails its CRC-32"):
        load_checkpoint(path, dst)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_non_strict_zero_match_refused_and_keys_recorded(tmp_path):
    sd = {f"encoder.{k}": v for k, v in _fresh(0).state_dict().items()}
    sd["encoder.extra"] = torch.ones(2)  # not a module prefix of everything: no detection
    torch.save({"weights": sd["encoder.0.weight"], "other": sd}, tmp_path / "w.pt")
    torch.save({"foo.a": torch.zeros(1), "bar.b": torch.zeros(1)}, tmp_path / "none.pt")
    dst = _fresh(1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "none.pt", dst, strict=False)
    msg = str(info.value)
    assert "matches none of Sequential's keys" in msg and "foo.a" in msg and "0.weight" in msg
    assert "another architecture" in msg and "prefix=" not in msg  # no prefix would help
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
    # a partial match loads and records both kinds of key problems
    part = dict(_fresh(0).state_dict())
    del part["2.bias"]
    part["head.weight"] = torch.zeros(1)
    torch.save(part, tmp_path / "part.pt")
    ck = load_checkpoint(tmp_path / "part.pt", dst, strict=False)
    assert ck.missing_keys == ("2.bias",) and ck.unexpected_keys == ("head.weight",)
    assert ck.to_dict()["unexpected_keys"] == ["head.weight"]


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda sd: sd.update(param_groups="oops"), r"optimizer\['param_groups'\] is a str"),
        (lambda sd: sd.update(perturbed=torch.ones(2)), r"optimizer\['perturbed'\] is a tensor of shape \[2\]"),
        (lambda sd: sd["param_groups"][0].update(perturbation_scale="abc"),
         r"\['param_groups'\]\[0\]\['perturbation_scale'\] is a str"),
        (lambda sd: sd["param_groups"][0].update(perturbation_scale=float("inf")),
         r"\['param_groups'\]\[0\]\['perturbation_scale'\] is inf"),
        (lambda sd: sd["param_groups"][0].update(perturbation_scale=torch.tensor(float("nan"))),
         r"\['perturbation_scale'\] is nan"),
        (lambda sd: sd.update(state="x"), r"optimizer\['state'\] is a str"),
        (lambda sd: sd["state"].update({0: 5}), r"optimizer\['state'\]\[0\] is an int"),
        (lambda sd: sd["state"][0]["momentum_buffer"].fill_(float("nan")),
         r"\['state'\]\[0\]\['momentum_buffer'\] \(for '0.weight'\) holds non-finite"),
        (lambda sd: sd["param_groups"][0].update(normalize="yes"), r"\['normalize'\] is a str"),
    ],
)
def test_malformed_or_non_finite_msam_state_refused(tmp_path, edit, key):
    from msam import MSAM

    model, opt = _msam_run(lambda p: MSAM(p, lr=0.05, momentum=0.9, rho=0.7), factory=mlp)
    sd = opt.state_dict()
    assert sd["perturbed"]
    if "normalize" in key:
        sd["param_groups"][0].pop("perturbation_scale")
    edit(sd)
    path = tmp_path / "m.pt"
    torch.save({"model": model.state_dict(), "optimizer": sd}, path)
    dst = _fresh(1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NaN weights with a warning: an error
        with pytest.raises(CheckpointError, match=key) as info:
            load_checkpoint(path, dst)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


# --------------------------------------------------------------------------------------------
# checkpoints as frameworks write them: prefixes, Lightning, Hugging Face folders


class _Holder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.net = inner
        self.criterion = nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64))


def test_module_attribute_prefix_detected_and_explicit(tmp_path):
    src = _fresh(0)
    torch.save({"state_dict": _Holder(src).state_dict(), "epoch": 1}, tmp_path / "h.ckpt")
    dst = _fresh(1)
    ck = load_checkpoint(tmp_path / "h.ckpt", dst)
    assert _same(src, dst)
    assert ck.prefix == "net." and ck.ignored_keys == ("criterion.weight",)
    assert not ck.unexpected_keys and ck.to_dict()["prefix"] == "net."
    dst = _fresh(2)
    ck = load_checkpoint(tmp_path / "h.ckpt", dst, prefix="net")  # the dot is optional
    assert _same(src, dst) and ck.prefix == "net."
    with pytest.raises(CheckpointError, match="no key starts with prefix 'model.'"):
        load_checkpoint(tmp_path / "h.ckpt", _fresh(2), prefix="model.")
    with pytest.raises(CheckpointError, match=r"matches none.*pass prefix=.net\.."):  # "" turns detection off
        load_checkpoint(tmp_path / "h.ckpt", _fresh(2), prefix="")
    with pytest.raises(TypeError, match="prefix"):
        load_checkpoint(tmp_path / "h.ckpt", _fresh(2), prefix=1)


@pytest.mark.parametrize(
    "rename",
    [
        pytest.param(lambda k: f"_orig_mod.{k}", id="compile"),
        pytest.param(lambda k: f"module.{k}", id="ddp"),
        pytest.param(lambda k: f"module._orig_mod.{k}", id="ddp+compile"),
        pytest.param(lambda k: f"model._orig_mod.{k}", id="lightning+compile"),
        pytest.param(lambda k: f"model.module.{k}", id="lightning+ddp"),
        pytest.param(lambda k: k.replace("0.", "0._orig_mod.", 1) if k.startswith("0.") else k,
                     id="compiled-submodule"),
    ],
)
def test_wrapper_prefixes_also_nested(tmp_path, rename):
    src = _fresh(0)
    torch.save({"state_dict": {rename(k): v for k, v in src.state_dict().items()}}, tmp_path / "c.pt")
    dst = _fresh(1)
    load_checkpoint(tmp_path / "c.pt", dst)
    assert _same(src, dst)


def test_lightning_checkpoint_written_by_lightning(tmp_path):
    L = pytest.importorskip("lightning", reason="lightning is not installed")

    class Module(L.LightningModule):
        def __init__(self, width=5):
            super().__init__()
            self.save_hyperparameters()
            self.model = mlp(hidden=width, dtype=torch.float32)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=True,
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False)
    module = Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    path = next(tmp_path.rglob("*.ckpt"))
    raw = torch.load(path, weights_only=False)
    assert set(raw["state_dict"]) == {f"model.{k}" for k in module.model.state_dict()}
    dst = mlp(seed=4, dtype=torch.float32)
    ck = load_checkpoint(path, dst)  # weights_only=True: Lightning 2.x writes plain containers
    assert ck.prefix == "model." and ck.optimizer_state is not None
    assert ck.metadata["epoch"] == 0 and ck.metadata["hyper_parameters"] == {"width": 5}
    for k, v in module.model.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_lightning_like_msam_checkpoint_is_moved_back(tmp_path):
    """Lightning stores optimizers under "optimizer_states": the MSAM move-back uses it."""
    model, opt = _msam_run(_msam, factory=mlp)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "optimizer_states": [opt.state_dict()], "epoch": 0}, tmp_path / "l.ckpt")
    opt.eval()
    dst = _fresh(3)
    with pytest.warns(PerturbedCheckpointWarning):
        ck = load_checkpoint(tmp_path / "l.ckpt", dst)
    assert ck.unperturbed and ck.prefix == "model."
    for k, v in model.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, rtol=1e-12, atol=1e-12)
    sd = opt.state_dict()
    sd["param_groups"] = 3
    torch.save({"state_dict": model.state_dict(), "optimizer_states": [sd]}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"optimizer_states\[0\]\['param_groups'\] is an int"):
        load_checkpoint(tmp_path / "bad.ckpt", _fresh(3))


def _tiny_gpt2(seed):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("shard", ["10KB", None], ids=["sharded", "single"])
def test_hugging_face_save_pretrained_folder(tmp_path, shard):
    src = _tiny_gpt2(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if shard:
            src.save_pretrained(tmp_path, max_shard_size=shard)
        else:
            src.save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert ("model.safetensors.index.json" in names) == bool(shard), names
    dst = _tiny_gpt2(1)
    assert not _same(src, dst)
    ck = load_checkpoint(tmp_path, dst)  # the tied lm_head.weight is not in the files
    assert _same(src, dst) and ck.format == "safetensors" and not ck.missing_keys
    assert dst.lm_head.weight.data_ptr() == dst.transformer.wte.weight.data_ptr()  # still tied
    if shard:
        assert ck.metadata["shards"] > 1
    assert find_checkpoints([tmp_path]) == [tmp_path]


def test_hugging_face_bin_folder_sharded(tmp_path):
    """``pytorch_model.bin`` shards with their index (written by hand: transformers 5 writes safetensors)."""
    src = _fresh(0)
    sd = src.state_dict()
    keys = list(sd)
    torch.save({k: sd[k] for k in keys[:2]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in keys[2:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: f"pytorch_model-0000{1 + (i >= 2)}-of-00002.bin" for i, k in enumerate(keys)}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    dst = _fresh(1)
    ck = load_checkpoint(tmp_path, dst)
    assert _same(src, dst) and ck.format == "torch"
    weight_map[keys[0]] = "pytorch_model-00002-of-00002.bin"  # the index disagrees with the shards
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=rf"00002\.bin lacks tensors .*{keys[0]}"):
        load_checkpoint(tmp_path, _fresh(1))
    (tmp_path / "pytorch_model.bin.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid shard index"):
        load_checkpoint(tmp_path, _fresh(1))


def test_lightning_hyperparameters_with_objects_are_refused_clearly(tmp_path):
    """Lightning pickles ``save_hyperparameters()`` of an ``argparse.Namespace`` as the object:
    weights_only loading refuses it, and the message says why (checked on a real Lightning file
    by hand; here the same layout without running a Trainer)."""
    import argparse

    torch.save({"state_dict": {f"model.{k}": v for k, v in _fresh(0).state_dict().items()},
                "hyper_parameters": {"args": argparse.Namespace(width=5)}, "epoch": 0},
               tmp_path / "ns.ckpt")
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(tmp_path / "ns.ckpt", _fresh(1))
    msg = str(info.value)
    assert "argparse.Namespace" in msg and "Lightning checkpoint" in msg and "allow_pickle=True" in msg
    ck = load_checkpoint(tmp_path / "ns.ckpt", _fresh(1), allow_pickle=True)
    assert ck.prefix == "model."


def test_cli_prefix_option(tmp_path, capsys):
    from landscape.cli import main
    from tests.reliability.corpus import make_corpus

    path = make_corpus(tmp_path)["ambiguous_prefix"]  # "student." and "teacher." both fit
    spec = ["--model", "tests.reliability.corpus:corpus_model",
            "--data", "tests.reliability.corpus:corpus_data", "--quiet"]
    assert main(["sharpness", str(path), *spec]) == 1
    assert "several prefixes" in capsys.readouterr().err
    assert main(["sharpness", str(path), *spec, "--prefix", "teacher.", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoints"][0]["checkpoint"].endswith("ambiguous_prefix.ckpt")


def test_meta_device_model_keys_are_not_taken_for_tied(tmp_path):
    """On the meta device every tensor has data_ptr 0: that must not make all keys "tied"."""
    sd = dict(mlp(d=5, classes=5).state_dict())  # 0.bias and 2.bias: same shape, same stride
    del sd["2.bias"]
    torch.save(sd, tmp_path / "m.pt")
    with torch.device("meta"):
        target = mlp(d=5, classes=5)
    ck = load_checkpoint(tmp_path / "m.pt", mlp(d=5, classes=5, seed=1), strict=False)
    assert ck.missing_keys == ("2.bias",)
    from landscape.checkpoints.matching import tie_groups

    assert all(len(g) == 1 for g in tie_groups(target))
    # loading into a meta model would load nothing: refused (issue 26, item 4)
    with pytest.raises(CheckpointError, match="meta device"):
        load_checkpoint(tmp_path / "m.pt", target)


def test_real_compile_and_data_parallel_wrappers(tmp_path):
    """State dicts of the real wrappers (torch.compile compiles lazily: no compilation here)."""
    src = _fresh(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # raised by importing torch._dynamo
        compiled = torch.compile(src)
    holder = _Holder(compiled)  # a Lightning-like module around a compiled network
    for name, sd in [("compiled", compiled.state_dict()),
                     ("dp-compiled", nn.DataParallel(compiled).state_dict()),
                     ("holder-compiled", {"state_dict": holder.state_dict()})]:
        torch.save(sd, tmp_path / f"{name}.pt")
        dst = _fresh(1)
        load_checkpoint(tmp_path / f"{name}.pt", dst)
        assert _same(src, dst), name
    raw = torch.load(tmp_path / "dp-compiled.pt", weights_only=True)
    assert all(k.startswith("module._orig_mod.") for k in raw)
    assert any(k.startswith("net._orig_mod.") for k in torch.load(tmp_path / "holder-compiled.pt")["state_dict"])


def test_perturbed_weights_are_moved_back_by_msam(tmp_path, monkeypatch):
    """The move-back is msam's (msam owns its state format): the loader hands the weights in
    the optimizer's order to msam.unperturbed_parameters and stores what it returns."""
    from landscape.checkpoints import unperturb
    from msam import MSAM

    model = _fresh(0)
    opt = MSAM(model.parameters(), lr=0.1, rho=0.5)
    x = torch.randn(8, 6, dtype=torch.float64)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "p.pt")
    calls = []
    real = unperturb.unperturbed_parameters

    def spy(state_dict, params, **kw):
        calls.append([p.clone() for p in params])
        return real(state_dict, params, **kw)

    monkeypatch.setattr(unperturb, "unperturbed_parameters", spy)
    with pytest.warns(PerturbedCheckpointWarning):
        ck = load_checkpoint(tmp_path / "p.pt")
    assert len(calls) == 1
    assert all(torch.equal(a, p) for a, p in zip(calls[0], model.parameters()))
    opt.eval()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ck.state_dict[name], p.detach(), rtol=0, atol=1e-14)


class _ConvNet(nn.Module):  # a ResNet's top-level names: stem, layers, fc
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.layers = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, 2)


class _Encoder(nn.Module):  # a ViT's: embed, enc.layers, head
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.enc = nn.Module()
        self.enc.layers = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, 2)


def test_wrong_architecture_names_no_prefix_that_cannot_help(tmp_path):
    """A ResNet file loaded into a ViT used to suggest prefix='layers.', merely one of the
    ResNet's top-level names; a prefix is suggested only when removing it makes keys match."""
    torch.save(_ConvNet().state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "resnet.pt", _Encoder())
    msg = str(info.value)
    assert "prefix=" not in msg and "another architecture" in msg and "\n" not in msg
    assert "layers.0.weight" in msg and "embed.weight" in msg  # a few keys of each side
    # a real prefix is still suggested, and it does make the file load
    torch.save({f"student.{k}": v for k, v in _Encoder().state_dict().items()}, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match=r"pass prefix='student\.' \(command line: --prefix student\.\)"):
        load_checkpoint(tmp_path / "s.pt", _Encoder(), prefix="")
    load_checkpoint(tmp_path / "s.pt", _Encoder(), prefix="student.")
