"""A malicious / malformed checkpoint corpus, generated into a temporary folder.

Every file of :func:`make_corpus` must be refused by every entry point that reads checkpoints
(``load_checkpoint`` and the CLI subcommands) with a one-line error naming the file and the
reason in :data:`REASONS`, without running anything from the file (the pickle payloads would
create :func:`marker_path`) and without changing the model. The files are built for
:func:`corpus_model` (CLI: ``--model tests.reliability.corpus:corpus_model --data
tests.reliability.corpus:corpus_data``); :func:`make_renamed` holds valid checkpoints under a
misleading suffix, which must load (the format is recognized by content).
"""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import pickle
import struct
import zipfile

import torch
from torch import nn

__all__ = ["make_corpus", "make_renamed", "marker_path", "corpus_model", "corpus_data", "REASONS"]

#: regular expression the error message must match, per corpus entry (strict and non-strict)
REASONS: dict[str, str] = {
    "fifo": r"FIFO",
    "dangling_symlink": r"dangling symlink",
    "directory_as_file": r"directory without model weights",
    "empty": r"not a checkpoint: the file is empty",
    "png": r"not a checkpoint: it looks like a PNG image",
    "json": r"not a checkpoint: it looks like JSON",
    "text": r"not a checkpoint: it looks like text",
    "truncated_zip": r"truncated or damaged zip",
    "bitflip_zip": r"corrupt: member '.*data/\d+' fails its CRC-32",
    "zip_not_torch": r"zip archive without data\.pkl",
    "truncated_legacy": r"not a readable PyTorch checkpoint",
    "truncated_safetensors": r"not a readable safetensors file",
    "truncated_safetensors_header": r"truncated safetensors file: its header says \d+ bytes",
    "pickle_reduce": r"refused to load .*nothing in it was run",
    "legacy_pickle_reduce": r"refused to load .*nothing in it was run",
    "raw_pickle_reduce": r"refused to load .*nothing in it was run",
    "wrong_model": r"shape",
    "zero_match": r"matches none of .*another architecture",
    "ambiguous_prefix": r"several prefixes",
    "no_weights": r"no model weights",
    "nonfinite_scale": r"\['perturbation_scale'\] is inf.*not finite",
    "nan_momentum": r"\['momentum_buffer'\].*non-finite",
    "nan_rho": r"\['rho'\] is nan.*not finite",
    "param_groups_str": r"\['param_groups'\] is a str",
    "perturbed_tensor": r"\['perturbed'\] is a tensor of shape \[3\]",
    "scale_str": r"\['perturbation_scale'\] is a str \('abc'\)",
    "state_not_dict": r"\['state'\] is a list",
    "group_not_dict": r"\['param_groups'\]\[0\] is a str",
    "params_not_list": r"\['params'\] is an int",
    "momentum_not_tensor": r"\['momentum_buffer'\] is a list",
    "hf_index_escape": r"shard files outside its folder",
    "hf_missing_shard": r"not found|lacks tensors",
}


def corpus_model(seed: int = 0) -> nn.Sequential:
    """The model the corpus is built for: Linear(4, 3) - Tanh - Linear(3, 2), float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def corpus_data() -> tuple[torch.Tensor, torch.Tensor]:
    """(X, y) that fit :func:`corpus_model`: 16 samples, 2 classes."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (16,), generator=g)


def marker_path(folder: str | pathlib.Path) -> pathlib.Path:
    """The file the corpus' pickle payloads would create if they ever ran."""
    return pathlib.Path(folder) / "PAYLOAD_RAN"


class _Payload:
    """Unpickling this calls ``pathlib.Path.touch(marker)`` (a harmless stand-in for os.system)."""

    def __init__(self, target: pathlib.Path):
        self.target = str(target)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def _perturbed_msam(model: nn.Module) -> dict:
    """A real MSAM state_dict saved at the perturbed point (after two steps)."""
    from msam import MSAM

    x, y = corpus_data()
    opt = MSAM(model.parameters(), lr=0.1, momentum=0.9, rho=0.5)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    sd = opt.state_dict()
    assert sd.get("perturbed"), "MSAM no longer records 'perturbed': update the corpus"
    return sd


def make_corpus(folder: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """Write the corpus into ``folder``; returns ``{name: path}`` (names as in :data:`REASONS`).

    ``fifo`` is left out where ``os.mkfifo`` does not exist.
    """
    root = pathlib.Path(folder) / "corpus"
    root.mkdir(parents=True, exist_ok=True)
    marker = marker_path(folder)
    out: dict[str, pathlib.Path] = {}

    def put(name: str, suffix: str = ".pt") -> pathlib.Path:
        out[name] = root / f"{name}{suffix}"
        return out[name]

    good = corpus_model(1).state_dict()

    if hasattr(os, "mkfifo"):
        os.mkfifo(put("fifo"))
    os.symlink(root / "does-not-exist.pt", put("dangling_symlink"))
    put("directory_as_file").mkdir()
    put("empty").write_bytes(b"")
    put("png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(64))
    put("json").write_text(json.dumps({"model": {"0.weight": [[1.0, 2.0]]}}))
    put("text").write_text("these are not the weights you are looking for\n")

    buf = io.BytesIO()
    torch.save(good, buf)
    blob = buf.getvalue()
    put("truncated_zip").write_bytes(blob[: len(blob) // 2])
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:  # flip one bit inside the largest tensor's bytes
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        local = blob[info.header_offset: info.header_offset + 30]
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
    flipped = bytearray(blob)
    flipped[start + info.file_size // 2] ^= 0x04
    put("bitflip_zip").write_bytes(bytes(flipped))
    buf = io.BytesIO()
    torch.save(good, buf, _use_new_zipfile_serialization=False)
    put("truncated_legacy").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    with zipfile.ZipFile(put("zip_not_torch"), "w") as zf:
        zf.writestr("hello.txt", "not a model")

    from safetensors.torch import save as st_save

    st = st_save({k: v.contiguous() for k, v in good.items()})
    put("truncated_safetensors", ".safetensors").write_bytes(st[: len(st) - 20])
    put("truncated_safetensors_header", ".safetensors").write_bytes(st[:40])

    torch.save({"model": good, "extra": _Payload(marker)}, put("pickle_reduce"))
    torch.save({"model": good, "extra": _Payload(marker)}, put("legacy_pickle_reduce"),
               _use_new_zipfile_serialization=False)
    put("raw_pickle_reduce", ".pth").write_bytes(pickle.dumps(_Payload(marker), protocol=4))

    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 5)).double()  # no shape in common
    torch.save(other.state_dict(), put("wrong_model"))
    torch.save({f"encoder.layers.{i}.w": torch.zeros(2) for i in range(3)}, put("zero_match"))
    torch.save({"state_dict": {**{f"student.{k}": v for k, v in good.items()},
                               **{f"teacher.{k}": v for k, v in good.items()}}},
               put("ambiguous_prefix", ".ckpt"))
    torch.save({"epoch": 3, "lr": 0.1, "config": {"width": 3}}, put("no_weights"))

    def msam_case(name: str, edit) -> None:
        model = corpus_model(2)
        sd = _perturbed_msam(model)
        edit(sd)
        torch.save({"model": model.state_dict(), "optimizer": sd, "step": 2}, put(name))

    def first_state(sd: dict) -> dict:
        return sd["state"][next(iter(sd["state"]))]

    msam_case("nonfinite_scale", lambda sd: sd["param_groups"][0].update(perturbation_scale=math.inf))
    msam_case("nan_momentum", lambda sd: first_state(sd)["momentum_buffer"].view(-1).__setitem__(0, math.nan))

    def nan_rho(sd: dict) -> None:
        sd["param_groups"][0].pop("perturbation_scale", None)
        sd["param_groups"][0]["rho"] = math.nan

    msam_case("nan_rho", nan_rho)
    msam_case("param_groups_str", lambda sd: sd.update(param_groups="[{'params': [0, 1]}]"))
    msam_case("perturbed_tensor", lambda sd: sd.update(perturbed=torch.ones(3)))
    msam_case("scale_str", lambda sd: sd["param_groups"][0].update(perturbation_scale="abc"))
    msam_case("state_not_dict", lambda sd: sd.update(state=[1, 2]))
    msam_case("group_not_dict", lambda sd: sd.update(param_groups=["lr=0.1"]))
    msam_case("params_not_list", lambda sd: sd["param_groups"][0].update(params=0))
    msam_case("momentum_not_tensor", lambda sd: first_state(sd).update(momentum_buffer=[0.0, 1.0]))

    from safetensors.torch import save_file

    for name, shard in (("hf_index_escape", "../outside.safetensors"), ("hf_missing_shard", "model-gone.safetensors")):
        d = put(name, "")
        d.mkdir()
        save_file({k: v.contiguous() for k, v in good.items()}, d / "model-00001-of-00001.safetensors")
        weight_map = {k: "model-00001-of-00001.safetensors" for k in good}
        weight_map[next(iter(good))] = shard
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def make_renamed(folder: str | pathlib.Path) -> dict[str, tuple[pathlib.Path, dict[str, torch.Tensor]]]:
    """Valid checkpoints under a misleading suffix: ``{name: (path, the state_dict saved)}``."""
    from safetensors.torch import save_file

    root = pathlib.Path(folder) / "renamed"
    root.mkdir(parents=True, exist_ok=True)
    good = corpus_model(3).state_dict()
    save_file({k: v.contiguous() for k, v in good.items()}, root / "safetensors_named.pt")
    torch.save(good, root / "torch_named.safetensors")
    torch.save(good, root / "legacy_named.bin", _use_new_zipfile_serialization=False)
    return {p.stem: (p, good) for p in sorted(root.iterdir())}
