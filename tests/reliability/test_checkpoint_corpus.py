"""The malicious / malformed checkpoint corpus through ``load_checkpoint``: each file refused in
one line naming the file and the reason, no payload run, the model unchanged."""

import multiprocessing
import re

import pytest
import torch

from landscape import CheckpointError, load_checkpoint
from landscape.checkpoints import checkpoint_format
from tests.reliability.corpus import REASONS, corpus_model, make_corpus, make_renamed, marker_path


def _load_in_child(path, queue):
    try:
        load_checkpoint(path)
        queue.put("loaded")
    except Exception as exc:
        queue.put(f"{type(exc).__name__}: {exc}")


def _load_with_timeout(path, seconds=20.0):
    """load_checkpoint(path) in a forked child; fails the test if it does not return in time."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_load_in_child, args=(path, queue))
    child.start()
    child.join(timeout=seconds)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"load_checkpoint blocked on {path} for {seconds} s")
    return queue.get(timeout=5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    files = make_corpus(folder)
    if "fifo" in files:  # before anything in this process may open it
        assert "CheckpointError" in _load_with_timeout(files["fifo"])
    return folder, files


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [p.requires_grad for p in model.parameters()], model.training)


def test_corpus_covers_every_reason(corpus):
    _, files = corpus
    expected = set(REASONS) - ({"fifo"} if not hasattr(__import__("os"), "mkfifo") else set())
    assert set(files) == expected


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.parametrize("name", sorted(REASONS))
def test_corpus_file_refused(corpus, name, strict):
    folder, files = corpus
    if name not in files:
        pytest.skip(f"{name} cannot be made on this platform")
    path = files[name]
    model = corpus_model(7)
    before, grads, mode = _snapshot(model)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, model, strict=strict)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg, msg
    assert re.search(REASONS[name], msg), msg
    if "pickle" not in name:  # only real pickles may mention the opt-in
        assert "trust-pickle" not in msg and "allow_pickle" not in msg, msg
    assert not marker_path(folder).exists(), "a pickle payload ran"
    after, grads2, mode2 = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and grads == grads2 and mode == mode2


def test_corpus_without_model(corpus):
    """Without a model, the file-level problems are refused the same way."""
    folder, files = corpus
    model_level = {"wrong_model", "zero_match", "ambiguous_prefix"}
    for name, path in files.items():
        if name in model_level:
            load_checkpoint(path)  # nothing to match against: loads
            continue
        with pytest.raises(CheckpointError, match=REASONS[name]):
            load_checkpoint(path)
    assert not marker_path(folder).exists()


def test_fifo_never_blocks(corpus):
    """(The ``corpus`` fixture loads the FIFO in a child process first: a loader that opened it
    for reading would block forever, and fails the fixture instead of hanging the suite.)"""
    _, files = corpus
    if "fifo" not in files:
        pytest.skip("no os.mkfifo on this platform")
    with pytest.raises(CheckpointError, match="FIFO"):
        checkpoint_format(files["fifo"])


def test_renamed_files_load_by_content(tmp_path):
    for name, (path, saved) in make_renamed(tmp_path).items():
        model = corpus_model(9)
        ck = load_checkpoint(path, model)
        assert ck.format == ("safetensors" if name.startswith("safetensors") else "torch")
        for k, v in model.state_dict().items():
            assert torch.equal(v, saved[k]), (name, k)
