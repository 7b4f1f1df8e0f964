"""The CLI package's layout: one module per subcommand, its parser wired to its ``run``, the old
import paths kept, and the checkpoint header check taking its reasons from landscape.checkpoints."""

import argparse

import pytest
import torch

from landscape import CheckpointError
from landscape.checkpoints import checkpoint_format
from landscape.cli import demo, files, hessian, parser, report, sharpness
from landscape.cli import slice as slice_cmd
from tests.landscape import cli_fixtures as fx


def _subparsers():
    p = parser.build_parser()
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_each_subcommand_runs_its_own_module():
    choices = _subparsers()
    modules = {"sharpness": sharpness, "hessian": hessian, "slice": slice_cmd, "report": report,
               "demo": demo}
    assert list(choices)[:5] == list(modules)  # the order of `landscape --help`
    for name, module in modules.items():
        assert choices[name].get_default("func") is module.run, name
        assert choices[name].epilog == module.EPILOG
    assert "reproduce" in choices


def test_truncated_safetensors_header_reason_is_the_loaders(tmp_path):
    from safetensors.torch import save_file

    full = tmp_path / "full.safetensors"
    save_file(fx.trained_state(1), full)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:40])  # the header announces more bytes than the file has
    with pytest.raises(CheckpointError) as info:
        checkpoint_format(cut)
    assert f"{cut} {files.header_problem(cut)}" == str(info.value).splitlines()[0]
    assert files.header_problem(full) is None


@pytest.mark.parametrize("content,suffix,reason", [
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, ".pt", "is not a checkpoint (its content is a PNG image"),
    (b'{"a": 1}', ".pth", "is not a checkpoint (its content is text/JSON"),
    (b"", ".pt", "is empty (0 bytes)"),
    (b"hello", ".model", None)])  # another suffix: the loader's content check reports it later
def test_header_problem_by_suffix(tmp_path, content, suffix, reason):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(content)
    problem = files.header_problem(path)
    assert (problem is None) if reason is None else problem.startswith(reason), problem


def test_torch_checkpoint_passes_the_header_check(tmp_path):
    path = tmp_path / "ok.bin"
    torch.save(fx.trained_state(1), path)
    assert files.header_problem(path) is None
    assert files.checkpoint_paths([str(tmp_path)]) == [path]
