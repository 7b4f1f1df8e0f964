"""Every ``landscape`` subcommand that reads checkpoints, run on a corpus of bad files.

Each bad file is refused up front (before the model or the data are loaded) with exit code 1
(documented: unreadable inputs are runtime failures; malformed option values exit 2), one
stderr line naming the file, and no traceback; a FIFO never blocks.

The corpus is built inline here (a FIFO, a truncated torch zip, a PNG named ``.pt``, an empty
file, a truncated safetensors file, JSON named ``.pth``); ``tests/reliability/corpus.py`` may
replace it.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

from landscape.cli import main
from tests.landscape import cli_fixtures as fx

FIX = "tests.landscape.cli_fixtures"
SPEC = ["--model", f"{FIX}:model", "--data", f"{FIX}:data", "--quiet"]

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)


def _corpus(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(fx.trained_state(5), good)
    bad = {}
    if hasattr(os, "mkfifo"):
        bad["fifo"] = tmp_path / "pipe.pt"
        os.mkfifo(bad["fifo"])
    bad["truncated zip"] = tmp_path / "truncated.pt"
    bad["truncated zip"].write_bytes(good.read_bytes()[:700])
    bad["png"] = tmp_path / "image.pt"
    bad["png"].write_bytes(PNG)
    bad["empty"] = tmp_path / "empty.pt"
    bad["empty"].write_bytes(b"")
    bad["json"] = tmp_path / "config.pth"
    bad["json"].write_text('{"lr": 0.1}')
    from safetensors.torch import save_file

    full = tmp_path / "full.safetensors"
    save_file(fx.trained_state(5), str(full))
    bad["truncated safetensors"] = tmp_path / "cut.safetensors"
    bad["truncated safetensors"].write_bytes(full.read_bytes()[:-40])
    return good, bad


EXPECT = {
    "fifo": "is a FIFO (named pipe), not a regular file",
    "truncated zip": "is a damaged or truncated zip archive",
    "png": "is not a checkpoint (its content is a PNG image",
    "empty": "is empty (0 bytes)",
    "json": "is not a checkpoint (its content is text/JSON",
    "truncated safetensors": "is a truncated safetensors file",
}


def _argv(cmd, ckpt, tmp_path):
    extra = {"sharpness": [], "hessian": ["--top-k", "1"],
             "slice": ["--out", str(tmp_path / "s.png"), "--steps", "3"],
             "report": ["--out", str(tmp_path / "r.html")]}[cmd]
    return [cmd, str(ckpt), *SPEC, *extra]


def _run_with_timeout(argv, capsys, seconds=60):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("code", main(argv)), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"landscape {argv[0]} blocked on {argv[1]}"
    out, err = capsys.readouterr()
    return box["code"], out, err


@pytest.fixture
def no_compute(monkeypatch):
    from landscape.cli import setup as cli_setup

    def boom(*a, **k):
        raise AssertionError("the model or data were loaded before the checkpoint was checked")

    monkeypatch.setattr(cli_setup.Setup, "__init__", boom)


@pytest.mark.parametrize("cmd", ["sharpness", "hessian", "slice", "report"])
def test_every_bad_file_is_one_line_exit_1(cmd, tmp_path, capsys, no_compute):
    _, bad = _corpus(tmp_path)
    for kind, path in bad.items():
        code, out, err = _run_with_timeout(_argv(cmd, path, tmp_path), capsys)
        lines = err.strip().splitlines()
        assert code == 1, (kind, err)
        assert len(lines) == 1 and "Traceback" not in err, (kind, err)
        assert lines[0].startswith(f"landscape {cmd}: error: {path} {EXPECT[kind]}"), (kind, err)
        assert out == ""
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("cmd", ["sharpness", "report"])
def test_good_and_bad_files_together_compute_the_good_and_name_every_bad_one(cmd, tmp_path, capsys):
    """Issue 26 item 6: the good checkpoint is computed and written, every bad one is listed
    with its reason, exit 1."""
    good, bad = _corpus(tmp_path)
    argv = _argv(cmd, good, tmp_path) + (["--metric", "lambda_max"] if cmd == "sharpness" else
                                         ["--steps-1d", "3", "--steps-2d", "3", "--no-density"])
    argv[2:2] = [str(p) for p in bad.values()]
    code, out, err = _run_with_timeout(argv, capsys, seconds=300)
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in err, err
    assert lines[-1].startswith(f"landscape {cmd}: error: {len(bad)} of {len(bad) + 1} checkpoints "
                                "failed"), err
    assert "the others were computed" in lines[-1]
    assert str(good) not in lines[-1]
    listing = out if cmd == "sharpness" else (tmp_path / "r.html").read_text()
    assert "good.pt" in listing  # computed and shown
    for kind, path in bad.items():  # each bad one listed with its reason
        assert f"{path} {EXPECT[kind]}" in listing, (kind, listing)


@pytest.mark.parametrize("cmd", ["sharpness", "report"])
def test_only_bad_files_are_refused_up_front_naming_every_one(cmd, tmp_path, capsys, no_compute):
    _, bad = _corpus(tmp_path)
    argv = _argv(cmd, next(iter(bad.values())), tmp_path)
    argv[2:2] = [str(p) for p in list(bad.values())[1:]]
    code, _, err = _run_with_timeout(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert f"{len(bad)} of {len(bad)} checkpoints cannot be used (nothing was computed)" in lines[0]
    for path in bad.values():
        assert str(path) in lines[0]


def test_directory_scan_skips_a_fifo_and_checks_the_rest(tmp_path, capsys):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    good, _ = _corpus(tmp_path)
    d = tmp_path / "runs"
    d.mkdir()
    os.mkfifo(d / "pipe.pt")
    (d / "good.pt").write_bytes(good.read_bytes())
    code, out, err = _run_with_timeout(["sharpness", str(d), *SPEC, "--metric", "lambda_max"], capsys)
    assert code == 0, err
    assert "good.pt" in out and "pipe.pt" not in out


@pytest.mark.parametrize("direction", ["interpolate", "pca"])
def test_slice_direction_checkpoints_checked_up_front(direction, tmp_path, capsys, no_compute):
    good, bad = _corpus(tmp_path)
    target = bad["truncated zip"]
    if direction == "pca":
        d = tmp_path / "traj"
        d.mkdir()
        (d / "step1.pt").write_bytes(good.read_bytes())
        (d / "step2.pt").write_bytes(target.read_bytes())
        target = d / "step2.pt"
        spec = f"pca:{d}"
    else:
        spec = f"interpolate:{target}"
    argv = [*_argv("slice", good, tmp_path), "--direction", spec]
    code, _, err = _run_with_timeout(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert f"{target} is a damaged or truncated zip archive" in lines[0]


CORPUS_SPEC = ["--model", "tests.reliability.corpus:corpus_model",
               "--data", "tests.reliability.corpus:corpus_data", "--quiet"]


@pytest.mark.parametrize("cmd", ["sharpness", "hessian"])
def test_the_whole_checkpoint_corpus_through_the_cli(cmd, tmp_path, capsys):
    """tests/reliability/corpus.py (the loader's malicious/malformed corpus, 30+ files) through
    the CLI: every file refused (exit 1) with one line naming it and the loader's reason, no
    traceback, no payload run, nothing blocks."""
    import re

    from tests.reliability.corpus import REASONS, make_corpus, marker_path

    corpus = make_corpus(tmp_path)
    extra = ["--metric", "lambda_max"] if cmd == "sharpness" else ["--top-k", "1"]
    failures = []
    for name, path in corpus.items():
        code, out, err = _run_with_timeout([cmd, str(path), *CORPUS_SPEC, *extra], capsys)
        lines = err.strip().splitlines()
        if not (code == 1 and len(lines) == 1 and "Traceback" not in err
                and lines[0].startswith(f"landscape {cmd}: error: ") and path.name in lines[0]):
            failures.append((name, code, err))
            continue
        if name not in ("fifo", "dangling_symlink", "directory_as_file", "empty", "png", "json",
                        "text", "truncated_zip", "truncated_safetensors", "truncated_safetensors_header"):
            # past the CLI's header check: the loader's own reason reaches the user
            assert re.search(REASONS[name], lines[0]), (name, lines[0])
        assert out == ""
    assert not failures, failures
    assert not marker_path(tmp_path).exists(), "a pickle payload ran"
