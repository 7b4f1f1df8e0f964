"""Issue 26 (items 1-4, 11, 13): one validation step for every loaded checkpoint, whatever its
container: the perturbed state of every optimizer in it (Lightning's several optimizers, a
Hugging Face Trainer's ``optimizer.pt``), dtype classes, finiteness, the meta device, and
transformers' own key conversion for ``save_pretrained`` folders."""

import json
import struct
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from landscape import CheckpointError, find_checkpoints, load_checkpoint
from landscape.checkpoints import PerturbedCheckpointWarning
from msam import MSAM
from tests.models import classification_data, mlp


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train(model, x, y, opts, steps):
    """``steps`` full-batch cross-entropy steps of every optimizer in ``opts`` (left at w~)."""
    for _ in range(steps):
        for o in opts:
            o.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for o in opts:
            o.step()


def _two_optimizer_run(msam_first: bool, steps: int = 4):
    """A model trained by two optimizers (MSAM on one layer, SGD on the other), left at w~."""
    model = mlp(seed=0)
    x, y = classification_data(seed=0)
    first, second = list(model[0].parameters()), list(model[2].parameters())
    if not msam_first:
        first, second = second, first
    msam = MSAM(first, lr=0.05, momentum=0.9, rho=0.7)
    sgd = torch.optim.SGD(second, lr=0.05)
    opts = [msam, sgd] if msam_first else [sgd, msam]
    _train(model, x, y, opts, steps)
    assert msam.is_perturbed
    return model, opts, msam


@pytest.mark.parametrize("msam_first", [True, False], ids=["msam-first", "msam-second"])
def test_lightning_checkpoint_with_two_optimizers_is_moved_back(tmp_path, msam_first):
    model, opts, msam = _two_optimizer_run(msam_first)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "optimizer_states": [o.state_dict() for o in opts], "epoch": 0}, tmp_path / "l.ckpt")
    w_tilde = _state(model)
    msam.eval()
    w = _state(model)
    assert max(float((w[k] - w_tilde[k]).abs().max()) for k in w) > 1e-3
    dst = mlp(seed=5)
    with pytest.warns(PerturbedCheckpointWarning):
        ck = load_checkpoint(tmp_path / "l.ckpt", dst)
    assert ck.perturbed and ck.unperturbed
    for k, v in w.items():
        torch.testing.assert_close(dst.state_dict()[k], v, rtol=1e-12, atol=1e-12)
    # without a model the names come from the file (same order): moved back too
    with pytest.warns(PerturbedCheckpointWarning):
        ck = load_checkpoint(tmp_path / "l.ckpt", prefix="model.")
    for k, v in w.items():
        torch.testing.assert_close(ck.state_dict[k], v, rtol=1e-12, atol=1e-12)


def test_two_optimizers_that_cannot_be_matched_are_refused_not_loaded(tmp_path):
    model, opts, msam = _two_optimizer_run(True)
    sds = [o.state_dict() for o in opts]
    sds[1]["param_groups"][0]["params"].append(99)  # counts no longer add up to the model's
    torch.save({"state_dict": model.state_dict(), "optimizer_states": sds}, tmp_path / "l.ckpt")
    dst = mlp(seed=5)
    before = _state(dst)
    with pytest.raises(CheckpointError, match=r"optimizer_states\[0\]"):
        load_checkpoint(tmp_path / "l.ckpt", dst)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def _trainer_checkpoint(folder, model, opt, step=5):
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    torch.save({"step_size": 1}, folder / "scheduler.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_hf_trainer_checkpoint_folder_saved_perturbed_is_moved_back(tmp_path):
    model = mlp(seed=0)
    x, y = classification_data(seed=0)
    opt = MSAM(model.parameters(), lr=0.05, momentum=0.9, rho=0.7)
    _train(model, x, y, [opt], 4)
    out = tmp_path / "out"
    _trainer_checkpoint(out / "checkpoint-4", model, opt, 4)
    opt.eval()
    w = _state(model)
    _trainer_checkpoint(out / "checkpoint-10", model, opt, 10)  # saved at w: nothing to do
    dst = mlp(seed=5)
    with pytest.warns(PerturbedCheckpointWarning):
        ck = load_checkpoint(out / "checkpoint-4", dst)
    assert ck.perturbed and ck.unperturbed and ck.optimizer_state is not None
    for k, v in w.items():
        torch.testing.assert_close(dst.state_dict()[k], v, rtol=1e-12, atol=1e-12)
    # a Trainer output folder holds checkpoint-N folders: each is one checkpoint, in step order
    assert find_checkpoints([out]) == [out / "checkpoint-4", out / "checkpoint-10"]


def test_malformed_optimizer_containers_are_refused_naming_them(tmp_path):
    sd = mlp(seed=0).state_dict()
    torch.save({"state_dict": sd, "optimizer_states": {"a": 1}}, tmp_path / "c.ckpt")
    with pytest.raises(CheckpointError, match="optimizer_states is a dict, expected a list"):
        load_checkpoint(tmp_path / "c.ckpt", mlp(seed=1))
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(sd, folder / "model.safetensors")
    save_file(sd, folder / "optimizer.pt")
    with pytest.raises(CheckpointError, match="optimizer.pt is not an optimizer state saved by "
                                              "torch.save .it is a safetensors file"):
        load_checkpoint(folder, mlp(seed=1))


def _relabel_safetensors(path, dtype_code):
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    for k, v in header.items():
        if k != "__metadata__":
            v["dtype"] = dtype_code
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n:])


@pytest.mark.parametrize("code", ["I32", "U32"])
def test_safetensors_relabelled_as_integers_is_refused_naming_keys(tmp_path, code):
    src = mlp(seed=0, dtype=torch.float32)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), path)
    _relabel_safetensors(path, code)
    dst = mlp(seed=1, dtype=torch.float32)
    before = _state(dst)
    with pytest.raises(CheckpointError, match=r"integer.*0\.weight"):
        load_checkpoint(path, dst)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
    with pytest.raises(CheckpointError, match="no floating-point"):
        load_checkpoint(path)  # without a model: nothing to analyse


def test_all_int64_pt_is_refused(tmp_path):
    torch.save({k: (v * 1000).long() for k, v in mlp(seed=0).state_dict().items()}, tmp_path / "i.pt")
    with pytest.raises(CheckpointError, match=r"0\.weight.*int64"):
        load_checkpoint(tmp_path / "i.pt", mlp(seed=1))


def test_integer_buffers_still_load(tmp_path):
    from tests.models import cnn_bn

    src = cnn_bn(seed=0)
    torch.save(src.state_dict(), tmp_path / "bn.pt")
    dst = cnn_bn(seed=1)
    load_checkpoint(tmp_path / "bn.pt", dst)  # num_batches_tracked is int64 in both
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    # a state dict converted wholesale to float: the counter's whole numbers cast back exactly
    torch.save({k: v.double() for k, v in src.state_dict().items()}, tmp_path / "all_float.pt")
    load_checkpoint(tmp_path / "all_float.pt", cnn_bn(seed=2))
    sd = {k: v.double() for k, v in src.state_dict().items()}
    key = next(k for k in sd if k.endswith("num_batches_tracked"))
    sd[key] = sd[key] + 0.5  # not a whole number: the cast would change it
    torch.save(sd, tmp_path / "half_count.pt")
    with pytest.raises(CheckpointError, match="num_batches_tracked"):
        load_checkpoint(tmp_path / "half_count.pt", cnn_bn(seed=2))


def test_non_finite_weights_are_refused_naming_the_key(tmp_path):
    sd = mlp(seed=0).state_dict()
    sd["2.bias"][1] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    dst = mlp(seed=1)
    before = _state(dst)
    with pytest.raises(CheckpointError, match=r"non-finite.*2\.bias"):
        load_checkpoint(tmp_path / "nan.pt", dst)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


@pytest.mark.parametrize("layout", ["float8", "sparse"])
def test_non_finite_check_handles_float8_and_sparse_tensors(tmp_path, layout):
    from landscape.checkpoints.validation import validate_tensors

    t = torch.tensor([1.0, float("nan"), 0.0, 2.0])
    t = t.to(torch.float8_e4m3fn) if layout == "float8" else t.to_sparse()
    with pytest.raises(CheckpointError, match=r"non-finite .*w \(1 of 4 values\)"):
        validate_tensors({"w": t}, None, tmp_path / "x.pt")
    ok = torch.ones(4).to(torch.float8_e4m3fn) if layout == "float8" else torch.ones(4).to_sparse()
    validate_tensors({"w": ok}, None, tmp_path / "x.pt")


def test_a_buffer_the_model_itself_holds_non_finite_loads(tmp_path):
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.register_buffer("mask", torch.triu(torch.full((3, 3), float("-inf")), 1))

        def forward(self, x):
            return self.lin(x) + self.mask

    torch.manual_seed(0)
    src = Masked()
    torch.save(src.state_dict(), tmp_path / "masked.pt")
    dst = Masked()
    load_checkpoint(tmp_path / "masked.pt", dst)
    assert torch.equal(dst.lin.weight, src.lin.weight)
    sd = src.state_dict()
    sd["lin.bias"][0] = float("inf")
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"non-finite.*lin\.bias"):
        load_checkpoint(tmp_path / "bad.pt", Masked())


def test_model_on_meta_device_is_refused(tmp_path):
    torch.save(mlp(seed=0).state_dict(), tmp_path / "m.pt")
    with torch.device("meta"):
        target = mlp(seed=0)
    with pytest.raises(CheckpointError, match="meta device"):
        load_checkpoint(tmp_path / "m.pt", target)
    with pytest.raises(CheckpointError, match="meta device"):
        load_checkpoint(tmp_path / "m.pt", mlp(seed=1), map_location="meta")


def test_hf_index_with_empty_weight_map_is_a_checkpoint_error(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match="weight_map.*empty|no tensors"):
        load_checkpoint(folder)


def _hf_models():
    transformers = pytest.importorskip("transformers")
    return {
        "vit": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
            image_size=8, patch_size=4, num_labels=3)),
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=8, n_layer=1, n_head=2, vocab_size=20, n_positions=16, bos_token_id=0,
            eos_token_id=0)),
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=16, vocab_size=20, bos_token_id=0, eos_token_id=0)),
        "bert": lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
            hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
            vocab_size=20, num_labels=3)),
    }


@pytest.mark.parametrize("arch", ["vit", "vit-sharded", "gpt2", "llama", "bert"])
def test_save_pretrained_folders_that_transformers_loads_load_here(tmp_path, arch):
    make = _hf_models()[arch.split("-")[0]]
    torch.manual_seed(0)
    src = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src.save_pretrained(tmp_path / arch, **({"max_shard_size": "1KB"} if "sharded" in arch else {}))
    assert ("sharded" in arch) == (tmp_path / arch / "model.safetensors.index.json").exists()
    with warnings.catch_warnings():  # transformers itself loads it
        warnings.simplefilter("ignore")
        type(src).from_pretrained(tmp_path / arch)
    torch.manual_seed(1)
    dst = make()
    ck = load_checkpoint(tmp_path / arch, dst)
    assert not (ck.missing_keys or ck.unexpected_keys or ck.shape_mismatches)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_cli_lambda_max_of_a_two_optimizer_lightning_checkpoint_is_the_one_at_w(tmp_path, capsys):
    """Issue 26 item 1 end to end: the CLI used to report lambda_max at w~ (exit 0)."""
    from analysis.reference import dense_hessian
    from landscape.cli import main
    from tests.landscape import cli_fixtures as fx

    model = fx.model()
    x, y = fx.data()
    msam = MSAM([*model.inp.parameters(), *model.gate.parameters()], lr=0.1, momentum=0.9, rho=1.0)
    sgd = torch.optim.SGD([*model.norm.parameters(), *model.head.parameters()], lr=0.1)
    _train(model, x, y, [msam, sgd], 6)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "optimizer_states": [msam.state_dict(), sgd.state_dict()]}, tmp_path / "l.ckpt")

    def top(m):
        return float(torch.linalg.eigvalsh(dense_hessian(m, "cross_entropy", (x, y)))[-1])

    at_w_tilde = top(model)
    msam.eval()
    at_w = top(model)
    assert abs(at_w - at_w_tilde) > 2e-2 * abs(at_w)
    js = tmp_path / "s.json"
    code = main(["sharpness", str(tmp_path / "l.ckpt"), "--model", "tests.landscape.cli_fixtures:model",
                 "--data", "tests.landscape.cli_fixtures:data", "--metric", "lambda_max", "--quiet",
                 "--json", str(js)])
    assert code == 0, capsys.readouterr().err
    rec = json.loads(js.read_text())["checkpoints"][0]
    assert rec["perturbed"] is True
    assert rec["metrics"]["lambda_max"] == pytest.approx(at_w, rel=1e-3)  # float32 Lanczos
    assert rec["metrics"]["lambda_max"] != pytest.approx(at_w_tilde, rel=1e-2)


def test_cli_on_a_trainer_output_folder_computes_every_checkpoint_at_w(tmp_path, capsys):
    """Issue 26 item 2 end to end: ``landscape sharpness OUT`` on a Trainer output folder."""
    from analysis import evaluate
    from landscape.cli import main
    from tests.landscape import cli_fixtures as fx

    model = fx.model()
    x, y = fx.data()
    opt = MSAM(model.parameters(), lr=0.1, momentum=0.9, rho=1.0)
    _train(model, x, y, [opt], 4)
    out = tmp_path / "out"
    _trainer_checkpoint(out / "checkpoint-4", model, opt, 4)  # saved at w~
    (out / "runs").mkdir()  # what else a Trainer writes there: ignored
    (out / "README.md").write_text("model card")
    opt.eval()
    ref = evaluate(model, "cross_entropy", (x, y)).loss
    js = tmp_path / "s.json"
    code = main(["sharpness", str(out), "--model", "tests.landscape.cli_fixtures:model", "--data",
                 "tests.landscape.cli_fixtures:data", "--metric", "lambda_max", "--quiet", "--json", str(js)])
    assert code == 0, capsys.readouterr().err
    rec = json.loads(js.read_text())["checkpoints"]
    assert [r["checkpoint"] for r in rec] == [str(out / "checkpoint-4")]
    assert rec[0]["perturbed"] is True and rec[0]["loss"] == pytest.approx(ref, rel=1e-6)
