"""MSAM checkpoints of models with tied weights (an input embedding shared with the output head).

A state dict holds one key per name of a tied Parameter (``tok.weight`` and ``head.weight``;
GPT-2's ``transformer.wte.weight`` and ``lm_head.weight``). The loader's move-back from MSAM's
perturbed point ``w~`` must reach every one of them: ``load_state_dict`` copies the keys in
order, so an uncorrected twin loaded last would put the shared tensor back at ``w~`` while
every other parameter is at ``w``. The reference is the optimizer's own ``eval()``.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape import CheckpointError, load_checkpoint
from landscape.checkpoints import PerturbedCheckpointWarning
from msam import MSAM, SAM, AdamWMSAM

VOCAB, T = 23, 7


class TiedLM(nn.Module):
    """A next-token model whose output head is its input embedding (``head.weight = tok.weight``)."""

    def __init__(self, seed: int = 0, d: int = 6):
        super().__init__()
        torch.manual_seed(seed)
        self.tok = nn.Embedding(VOCAB, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.head.weight = self.tok.weight  # float32, as trained: w is reproduced exactly

    def forward(self, ids):
        h = self.tok(ids).cumsum(1) / torch.arange(1, ids.shape[1] + 1)[:, None]
        return self.head(torch.tanh(self.mix(h)))


def tied_lm():
    return TiedLM(seed=5)


def token_data():
    ids = torch.randint(0, VOCAB, (6, T + 1), generator=torch.Generator().manual_seed(1))
    return ids[:, :-1], ids[:, 1:]


def lm_loss(outputs, targets):
    return F.cross_entropy(outputs.flatten(0, 1), targets.flatten())


def _gpt2(seed):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


def _train(build, opt_cls, kw, steps=3):
    model = build(0)
    assert len(list(model.parameters())) < len(model.state_dict(keep_vars=True))  # tied
    opt = opt_cls(model.parameters(), **kw)
    x, y = token_data()
    for _ in range(steps):
        opt.zero_grad()
        if isinstance(model, TiedLM):
            lm_loss(model(x), y).backward()
        else:
            model(input_ids=x, labels=x).loss.backward()
        opt.step()
    return model, opt


OPTIMIZERS = [pytest.param(MSAM, dict(lr=0.05, rho=1.0), id="MSAM"),
              pytest.param(AdamWMSAM, dict(lr=1e-2, rho=0.3), id="AdamWMSAM")]
MODELS = [pytest.param(TiedLM, "tok.weight", id="hand-tied-LM"),
          pytest.param(_gpt2, "transformer.wte.weight", id="hf-gpt2")]


@pytest.mark.parametrize("opt_cls,kw", OPTIMIZERS)
@pytest.mark.parametrize("build,tied", MODELS)
@pytest.mark.parametrize("layout", ["model-optimizer", "lightning"])
def test_tied_weights_moved_back_like_eval(tmp_path, build, tied, opt_cls, kw, layout):
    model, opt = _train(build, opt_cls, kw)
    sd, osd = model.state_dict(), opt.state_dict()
    if layout == "lightning":
        torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()},
                    "optimizer_states": [osd]}, tmp_path / "mid.pt")
    else:
        torch.save({"model": sd, "optimizer": osd}, tmp_path / "mid.pt")
    perturbed = model.state_dict()[tied].clone()
    opt.eval()
    truth = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(perturbed, truth[tied])  # the check below can fail
    fresh = build(1)
    with pytest.warns(PerturbedCheckpointWarning):
        ck = load_checkpoint(tmp_path / "mid.pt", fresh)
    assert ck.unperturbed
    got = fresh.state_dict()
    for k, v in truth.items():
        assert torch.equal(got[k], v), k
    assert fresh.get_input_embeddings().weight is fresh.get_output_embeddings().weight \
        if not isinstance(fresh, TiedLM) else fresh.head.weight is fresh.tok.weight


@pytest.mark.parametrize("opt_cls,kw", OPTIMIZERS)
def test_tied_weights_moved_back_without_a_model(tmp_path, opt_cls, kw):
    """Without a model the tied keys are found by shared storage (torch.save keeps it); the
    old loader counted the twin as a parameter of its own and refused the file."""
    model, opt = _train(TiedLM, opt_cls, kw)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "mid.pt")
    opt.eval()
    with pytest.warns(PerturbedCheckpointWarning):
        ck = load_checkpoint(tmp_path / "mid.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(ck.state_dict[k], v), k
    assert ck.state_dict["head.weight"] is ck.state_dict["tok.weight"]


def test_tied_keys_with_different_values_are_refused(tmp_path):
    model, opt = _train(TiedLM, MSAM, dict(lr=0.05, rho=1.0))
    sd = dict(model.state_dict())
    sd["head.weight"] = sd["head.weight"] + 1.0  # cannot have come from a tied model
    torch.save({"model": sd, "optimizer": opt.state_dict()}, tmp_path / "bad.pt")
    fresh = TiedLM(seed=1)
    before = fresh.tok.weight.detach().clone()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "bad.pt", fresh)
    msg = str(info.value)
    assert "'tok.weight' and 'head.weight'" in msg and "different values" in msg
    assert "\n" not in msg and torch.equal(fresh.tok.weight, before)
    # nor as they are: a tied model can hold only one of the two values
    with pytest.raises(CheckpointError, match="one tied tensor of the model"):
        load_checkpoint(tmp_path / "bad.pt", TiedLM(seed=1), unperturb=False)
    sd.pop("head.weight")  # one key of the pair loads (the tie gives the other)
    torch.save({"model": sd, "optimizer": opt.state_dict()}, tmp_path / "one.pt")
    with pytest.warns(PerturbedCheckpointWarning):
        load_checkpoint(tmp_path / "one.pt", TiedLM(seed=1))
    # a tied parameter that MSAM did not perturb (frozen: no momentum) is not moved, so the
    # move-back does not refuse it; loading its two differing values into the tied model does
    frozen = TiedLM()
    frozen.tok.weight.requires_grad_(False)
    opt = MSAM(frozen.parameters(), lr=0.05, rho=1.0)
    x, y = token_data()
    for _ in range(2):
        opt.zero_grad()
        lm_loss(frozen(x), y).backward()
        opt.step()
    sd = dict(frozen.state_dict())
    sd["head.weight"] = sd["head.weight"] + 1.0
    torch.save({"model": sd, "optimizer": opt.state_dict()}, tmp_path / "frozen.pt")
    with pytest.raises(CheckpointError, match="one tied tensor of the model"):
        load_checkpoint(tmp_path / "frozen.pt", TiedLM(seed=1))


def test_sam_between_passes_still_refused_for_a_tied_model(tmp_path):
    model = TiedLM()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    x, y = token_data()
    lm_loss(model(x), y).backward()
    opt.first_step(zero_grad=True)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match="first_step"):
        load_checkpoint(tmp_path / "s.pt", TiedLM(seed=1))


def test_cli_hessian_loads_tied_weights_at_w(tmp_path, monkeypatch):
    """``landscape hessian`` on a mid-training tied checkpoint works on the weights of eval()."""
    import landscape.checkpoints.loading as loading
    from landscape.cli import main

    model, opt = _train(lambda s: tied_lm(), MSAM, dict(lr=0.05, rho=1.0))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "mid.pt")
    opt.eval()
    loaded = []
    real = loading.load_checkpoint

    def spy(path, model=None, **kw):
        out = real(path, model, **kw)
        loaded.append({k: v.clone() for k, v in model.state_dict().items()})
        return out

    monkeypatch.setattr(loading, "load_checkpoint", spy)  # the CLI imports it at call time
    here = __name__
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["hessian", str(tmp_path / "mid.pt"), "--model", f"{here}:tied_lm",
                   "--data", f"{here}:token_data", "--loss", f"{here}:lm_loss", "--top-k", "1",
                   "--quiet", "--json", str(tmp_path / "h.json")])
    assert rc == 0 and loaded
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[-1][k], v), k


def test_differing_tied_keys_are_refused_before_loading(tmp_path):
    # a file whose two keys of one tied tensor differ (not saved from this tied model): the
    # last one would win silently in load_state_dict; refused, the model unchanged
    import torch
    from torch import nn

    from landscape import CheckpointError, load_checkpoint

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(7, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.tok.weight

    src, dst = Tied(), Tied()
    state = {k: v.clone() for k, v in src.state_dict().items()}
    state["head.weight"] = state["head.weight"] + 0.5
    path = tmp_path / "untied.pt"
    torch.save(state, path)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError, match="tok.weight.*head.weight.*tied"):
        load_checkpoint(path, dst)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())
    same = {k: v.clone() for k, v in src.state_dict().items()}  # equal twins load fine
    torch.save(same, path)
    load_checkpoint(path, dst)
    assert torch.equal(dst.tok.weight, src.tok.weight)
