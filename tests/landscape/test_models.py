"""The reference models of ``landscape.models`` against hand-written references.

- parameter counts against closed-form counts written here from the papers' layouts (and the
  published torchvision / GPT-2 counts), never against the models' own output;
- forward passes against hand-written functional forwards (``F.conv2d``, ``F.batch_norm``, an
  explicit softmax attention) in float64, so the layouts are the documented ones;
- the GPT's causality (a future token never changes earlier logits) and its padding: the loss
  of a padded batch with ``-100`` labels (right or left padding, any pad id) equals the
  token-weighted loss of the unpadded sequences, one at a time;
- the synthetic data's rules, and one-line argument errors.
"""

from __future__ import annotations

import math
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from landscape import models as M

HAVE_TRANSFORMERS = __import__("importlib").util.find_spec("transformers") is not None
ROOT = pathlib.Path(__file__).resolve().parents[2]


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# parameter counts: closed forms written from the architectures' descriptions
# ------------------------------------------------------------------------------------------------
def bn(c):  # BatchNorm weight and bias
    return 2 * c


def resnet_count(blocks, width, classes, in_channels, bottleneck=False):
    """He et al.'s CIFAR-stem ResNet: 3x3 stem, stages of width w 2^i, option-B shortcuts."""
    total = 9 * in_channels * width + bn(width)
    cin = width
    for i, n in enumerate(blocks):
        p = width * 2**i
        out = 4 * p if bottleneck else p
        for j in range(n):
            if bottleneck:  # 1x1 -> 3x3 -> 1x1 (x4)
                total += cin * p + bn(p) + 9 * p * p + bn(p) + p * out + bn(out)
            else:  # 3x3 -> 3x3
                total += 9 * cin * p + bn(p) + 9 * p * p + bn(p)
            if cin != out or (i > 0 and j == 0):  # 1x1 projection + BN
                total += cin * out + bn(out)
            cin = out
    return total + cin * classes + classes


def block_count(d, m):  # LayerNorm, QKV, output projection, LayerNorm, MLP
    return 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * m + m) + (m * d + d)


def vit_count(image, patch, c, classes, d, depth, m):
    n = (image // patch) ** 2
    return (c * patch * patch * d + d) + d + (n + 1) * d + depth * block_count(d, m) + 2 * d \
        + d * classes + classes


def gpt_count(vocab, max_len, d, depth, m):
    return vocab * d + max_len * d + depth * block_count(d, m) + 2 * d  # head tied


# torchvision's published counts (ImageNet: 7x7 stem, 1000 classes), moved to a CIFAR stem with
# 10 classes: - 7*7*3*64 + 3*3*3*64 for the stem, - (f*1000 + 1000) + (f*10 + 10) for the head
def cifar_from_torchvision(imagenet_count, features):
    return imagenet_count - 49 * 3 * 64 + 9 * 3 * 64 - (features * 1000 + 1000) + features * 10 + 10


@pytest.mark.parametrize("depth, imagenet, features", [
    (18, 11_689_512, 512), (34, 21_797_672, 512), (50, 25_557_032, 2048),
    (101, 44_549_160, 2048), (152, 60_192_808, 2048)])
def test_resnet_counts_match_torchvision(depth, imagenet, features):
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
              152: (3, 8, 36, 3)}[depth]
    want = cifar_from_torchvision(imagenet, features)
    assert resnet_count(blocks, 64, 10, 3, bottleneck=depth >= 50) == want  # the formula itself
    with torch.device("meta"):
        assert count(M.resnet(depth)) == want
    if depth == 18:
        assert want == 11_173_962


@pytest.mark.parametrize("depth, width, classes, channels", [
    (10, 3, 7, 1), (18, 2, 4, 3), (18, 8, 10, 3), (34, 1, 2, 2), (50, 2, 5, 3)])
def test_resnet_counts_small(depth, width, classes, channels):
    bottleneck, blocks = M.RESNET_DEPTHS[depth]
    net = M.resnet(depth, width, classes, channels)
    assert count(net) == resnet_count(blocks, width, classes, channels, bottleneck)


@pytest.mark.parametrize("kw, m", [
    ({}, 768), ({"dim": 64, "depth": 2, "heads": 2}, 256),
    ({"image_size": 8, "patch_size": 2, "num_classes": 3, "dim": 6, "depth": 1, "heads": 3,
      "mlp_ratio": 1.5, "in_channels": 1}, 9)])
def test_vit_counts(kw, m):
    full = {"image_size": 32, "patch_size": 4, "num_classes": 10, "dim": 192, "depth": 12,
            "heads": 3, "in_channels": 3, **kw}
    want = vit_count(full["image_size"], full["patch_size"], full["in_channels"],
                     full["num_classes"], full["dim"], full["depth"], m)
    assert count(M.vit(**kw)) == want
    if not kw:
        assert want == 5_362_762  # the docstring's number


def test_gpt_counts():
    assert count(M.gpt()) == gpt_count(256, 256, 256, 4, 1024) == 3_290_624
    assert count(M.gpt(11, 6, 8, 2, 2, mlp_ratio=2)) == gpt_count(11, 6, 8, 2, 16)
    with torch.device("meta"):  # GPT-2 small: the published 124,439,808 (head tied to wte)
        assert count(M.gpt(50257, 1024, 768, 12, 12)) == gpt_count(50257, 1024, 768, 12, 3072) \
            == 124_439_808
    net = M.gpt(11, 6, 8, 1, 2)
    assert net.tok.weight.data_ptr() == dict(net.named_parameters())["tok.weight"].data_ptr()


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed")
def test_hf_gpt2_has_the_layout_of_gpt():
    """GPT2LMHeadModel and ``gpt`` with the same sizes have the same parameter shapes."""
    sizes = (13, 7, 8, 2, 2)
    hf, ours = M.hf_gpt2(*sizes), M.gpt(*sizes)
    assert count(hf) == count(ours) == gpt_count(13, 7, 8, 2, 32)
    assert sorted(p.numel() for p in hf.parameters()) == sorted(p.numel() for p in ours.parameters())
    assert not hf.training and hf.config.n_positions == 7


# ------------------------------------------------------------------------------------------------
# forwards against hand-written functional references (float64)
# ------------------------------------------------------------------------------------------------
def _bn(x, sd, key):
    return F.batch_norm(x, sd[f"{key}.running_mean"], sd[f"{key}.running_var"],
                        sd[f"{key}.weight"], sd[f"{key}.bias"], False, 0.0, 1e-5)


def _resnet_reference(sd, x, blocks, bottleneck):
    """torchvision's ResNet forward from a state dict, by module names (eval-mode BatchNorm)."""
    h = F.relu(_bn(F.conv2d(x, sd["conv1.weight"], padding=1), sd, "bn1"))
    for i, n in enumerate(blocks):
        for j in range(n):
            key = f"layer{i + 1}.{j}"
            stride = 2 if i > 0 and j == 0 else 1
            if f"{key}.downsample.0.weight" in sd:
                short = _bn(F.conv2d(h, sd[f"{key}.downsample.0.weight"], stride=stride), sd,
                            f"{key}.downsample.1")
            else:
                short = h
            if bottleneck:
                o = F.relu(_bn(F.conv2d(h, sd[f"{key}.conv1.weight"]), sd, f"{key}.bn1"))
                o = F.relu(_bn(F.conv2d(o, sd[f"{key}.conv2.weight"], stride=stride, padding=1),
                               sd, f"{key}.bn2"))
                o = _bn(F.conv2d(o, sd[f"{key}.conv3.weight"]), sd, f"{key}.bn3")
            else:
                o = F.relu(_bn(F.conv2d(h, sd[f"{key}.conv1.weight"], stride=stride, padding=1),
                               sd, f"{key}.bn1"))
                o = _bn(F.conv2d(o, sd[f"{key}.conv2.weight"], padding=1), sd, f"{key}.bn2")
            h = F.relu(o + short)
    return F.linear(h.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


def _randomize_batchnorm(net):
    g = torch.Generator().manual_seed(7)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("depth, size", [(18, 32), (50, 16), (10, 9)])
def test_resnet_forward_matches_functional_reference(depth, size):
    torch.manual_seed(0)
    net = M.resnet(depth, width=2, num_classes=5).double().eval()
    _randomize_batchnorm(net)
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    bottleneck, blocks = M.RESNET_DEPTHS[depth]
    ref = _resnet_reference(net.state_dict(), x, blocks, bottleneck)
    with torch.no_grad():
        out = net(x)
    assert out.shape == (3, 5)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_resnet_stage_resolutions_and_names():
    """Strides 1, 2, 2, 2 after a stride-1 stem: 32 -> 32, 16, 8, 4; torchvision's names."""
    net = M.resnet(18, width=2).eval()
    sizes = []
    for i in range(1, 5):
        getattr(net, f"layer{i}").register_forward_hook(lambda m, a, o: sizes.append(o.shape[1:]))
    net(torch.randn(1, 3, 32, 32))
    assert [tuple(s) for s in sizes] == [(2, 32, 32), (4, 16, 16), (8, 8, 8), (16, 4, 4)]
    keys = set(net.state_dict())
    assert {"conv1.weight", "layer2.0.downsample.0.weight", "layer4.1.conv2.weight",
            "fc.bias"} <= keys
    assert not any(k.startswith("layer1.0.downsample") for k in keys)  # identity shortcut
    assert isinstance(net.layer1[0], M.BasicBlock)
    assert isinstance(M.resnet(50, width=1).layer1[0], M.Bottleneck)


def _attention(x, w_in, b_in, w_out, b_out, heads, causal):
    """Multi-head attention by hand: softmax(q k^T / sqrt(d_h)) v, heads concatenated."""
    b, t, d = x.shape
    q, k, v = F.linear(x, w_in, b_in).split(d, dim=-1)
    q, k, v = (z.reshape(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if causal:
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    a = (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
    return F.linear(a, w_out, b_out)


def _ln(x, sd, key):
    return F.layer_norm(x, x.shape[-1:], sd[f"{key}.weight"], sd[f"{key}.bias"])


def _vit_reference(sd, x, patch, depth, heads):
    t = F.conv2d(x, sd["patch.weight"], sd["patch.bias"], stride=patch).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls"].expand(len(t), -1, -1), t], 1) + sd["pos"]
    for i in range(depth):
        key = f"encoder.{i}"
        t = t + _attention(_ln(t, sd, f"{key}.norm1"), sd[f"{key}.self_attn.in_proj_weight"],
                           sd[f"{key}.self_attn.in_proj_bias"],
                           sd[f"{key}.self_attn.out_proj.weight"],
                           sd[f"{key}.self_attn.out_proj.bias"], heads, causal=False)
        h = F.gelu(F.linear(_ln(t, sd, f"{key}.norm2"), sd[f"{key}.linear1.weight"],
                            sd[f"{key}.linear1.bias"]))
        t = t + F.linear(h, sd[f"{key}.linear2.weight"], sd[f"{key}.linear2.bias"])
    return F.linear(_ln(t[:, 0], sd, "norm"), sd["head.weight"], sd["head.bias"])


def test_vit_forward_matches_functional_reference():
    torch.manual_seed(0)
    net = M.vit(image_size=8, patch_size=2, num_classes=3, dim=8, depth=2, heads=2).double().eval()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        out = net(x)
    ref = _vit_reference(net.state_dict(), x, 2, 2, 2)
    assert out.shape == (4, 3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    # the blocks are initialized independently (nn.TransformerEncoder would copy one)
    assert not torch.equal(net.encoder[0].linear1.weight, net.encoder[1].linear1.weight)


def _gpt_reference(sd, ids, depth, heads):
    h = sd["tok.weight"][ids] + sd["pos.weight"][: ids.shape[1]]
    for i in range(depth):
        key = f"blocks.{i}"
        h = h + _attention(_ln(h, sd, f"{key}.ln1"), sd[f"{key}.qkv.weight"],
                           sd[f"{key}.qkv.bias"], sd[f"{key}.proj.weight"],
                           sd[f"{key}.proj.bias"], heads, causal=True)
        m = F.gelu(F.linear(_ln(h, sd, f"{key}.ln2"), sd[f"{key}.mlp.0.weight"],
                            sd[f"{key}.mlp.0.bias"]))
        h = h + F.linear(m, sd[f"{key}.mlp.2.weight"], sd[f"{key}.mlp.2.bias"])
    return _ln(h, sd, "ln") @ sd["tok.weight"].T


def _tiny_gpt(depth=2):
    torch.manual_seed(0)
    return M.gpt(vocab_size=11, max_len=8, dim=8, depth=depth, heads=2).double().eval()


def test_gpt_forward_matches_functional_reference():
    net = _tiny_gpt()
    ids = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = net(ids)
    assert out.shape == (3, 7, 11)
    torch.testing.assert_close(out, _gpt_reference(net.state_dict(), ids, 2, 2),
                               rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# the GPT: causality and padding
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_mask", [False, True])
def test_gpt_is_causal(with_mask):
    net = _tiny_gpt()
    ids = torch.randint(1, 11, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids) if with_mask else None
    with torch.no_grad():
        base = net(ids, mask)
        for t in range(8):
            changed = ids.clone()
            changed[:, t] = changed[:, t] % 10 + 1  # another real token
            out = net(changed, mask)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-13)
            assert not torch.allclose(out[:, t:], base[:, t:])  # the test can fail


def _unpadded_loss(net, seqs):
    """Token-weighted mean next-token cross-entropy of each sequence run on its own."""
    total, n = 0.0, 0
    for s in seqs:
        with torch.no_grad():
            logits = net(s[None])[0]
        total += float(F.cross_entropy(logits[:-1], s[1:], reduction="sum"))
        n += len(s) - 1
    return total / n


def _padded(seqs, left, pad_id):
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        cols = slice(t - len(s), t) if left else slice(0, len(s))
        ids[i, cols], mask[i, cols] = s, 1
    return ids, mask, ids.masked_fill(mask == 0, M.IGNORE_INDEX)


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("pad_id", [0, 5])
def test_gpt_padding_and_ignored_labels(left, pad_id):
    net = _tiny_gpt()
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1, 11, (n,), generator=g) for n in (8, 3, 5, 2)]
    ref = _unpadded_loss(net, seqs)
    ids, mask, labels = _padded(seqs, left, pad_id)
    with torch.no_grad():
        out = net(ids, attention_mask=mask, labels=labels)
    assert set(out) == {"loss", "logits"} and out["logits"].shape == (4, 8, 11)
    assert float(out["loss"]) == pytest.approx(ref, rel=1e-12)
    for i, s in enumerate(seqs):  # the real tokens' logits are those of the lone sequence
        with torch.no_grad():
            alone = net(s[None])[0]
        rows = mask[i].bool()
        torch.testing.assert_close(out["logits"][i, rows], alone, rtol=1e-10, atol=1e-12)
    if not left:  # right padding needs no mask: causal attention never looks ahead
        with torch.no_grad():
            nomask = net(ids, labels=labels)["loss"]
        assert float(nomask) == pytest.approx(ref, rel=1e-12)


def test_gpt_loss_is_the_toolkits_lm_loss():
    """``model(**batch)["loss"]`` equals ``loss_fn="lm"`` on the logits, also across uneven
    padded batches (``"model_lm"`` weighting by tokens)."""
    from analysis import evaluate

    net = _tiny_gpt()
    batches = M.lm_batches((5, 3, 4), vocab_size=11, max_len=8)
    seqs = [b["input_ids"][i, b["attention_mask"][i].bool()] for b in batches
            for i in range(len(b["input_ids"]))]
    ref = _unpadded_loss(net, seqs)
    assert evaluate(net, "lm", batches).loss == pytest.approx(ref, rel=1e-10)
    assert evaluate(net, "model_lm", batches).loss == pytest.approx(ref, rel=1e-10)


def test_gpt_refuses_too_long_input():
    with pytest.raises(ValueError, match=r"max_len=8, got shape \(1, 9\)"):
        _tiny_gpt(1)(torch.zeros(1, 9, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# synthetic data
# ------------------------------------------------------------------------------------------------
def test_image_data_rule_and_determinism():
    state = torch.get_rng_state()
    x, y = M.image_data(2000, num_classes=10, image_size=32)
    assert torch.equal(torch.get_rng_state(), state)  # own generator
    assert x.shape == (2000, 3, 32, 32) and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))
    score = x[:, 0].mean((1, 2)) - x[:, 1, :16].mean((1, 2))
    cuts = [2.4 / 32 * (-1 + 2 * k / 8) for k in range(9)]
    want = torch.tensor([sum(float(s) > c for c in cuts) for s in score])
    assert torch.equal(y, want)
    x2, y2 = M.image_data(2000, num_classes=10, image_size=32)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    _, y_bin = M.image_data(50, num_classes=2, channels=1)
    assert set(y_bin.tolist()) == {0, 1}


def test_lm_sequences_data_and_batches():
    ids, mask = M.lm_sequences(20, vocab_size=7, max_len=9, min_len=3, seed=4)
    lengths = mask.sum(1)
    assert ids.shape == (20, 9) and int(lengths.min()) >= 3 and int(lengths.max()) <= 9
    assert torch.equal(mask, (torch.arange(9)[None] < lengths[:, None]).long())  # right padding
    for row, n in zip(ids, lengths.tolist()):
        assert all(1 <= int(v) <= 6 for v in row[:n]) and not row[n:].any()
        assert all(int(row[j + 1]) == int(row[j]) % 6 + 1 for j in range(n - 1))
    _, targets = M.lm_data(20, vocab_size=7, max_len=9, min_len=3, seed=4)
    for row, tg, n in zip(ids, targets, lengths.tolist()):
        assert torch.equal(tg[: n - 1], row[1:n]) and (tg[n - 1:] == -100).all()
    batches = M.lm_batches((2, 5), vocab_size=7, max_len=9, min_len=3, seed=4)
    assert [len(b["input_ids"]) for b in batches] == [2, 5]
    ids, mask = M.lm_sequences(7, vocab_size=7, max_len=9, min_len=3, seed=4)
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), ids)
    assert torch.equal(batches[1]["attention_mask"], mask[2:])
    assert torch.equal(batches[1]["labels"], ids[2:].masked_fill(mask[2:] == 0, -100))


# ------------------------------------------------------------------------------------------------
# argument errors: one line naming the value, before anything is built
# ------------------------------------------------------------------------------------------------
BAD = [
    (M.resnet, {"depth": 20}, ValueError, "depth must be one of 10, 18, 34, 50, 101, 152; got 20"),
    (M.resnet, {"depth": "18"}, TypeError, "depth must be an integer, got str '18'"),
    (M.resnet, {"width": 0}, ValueError, "width must be >= 1, got 0"),
    (M.resnet, {"width": 2.0}, TypeError, "width must be an integer, got float 2.0"),
    (M.resnet, {"num_classes": True}, TypeError, "num_classes must be an integer, got bool True"),
    (M.resnet, {"in_channels": 0}, ValueError, "in_channels must be >= 1, got 0"),
    (M.ResNet, {"widths": (2, 4), "blocks": (1,)}, ValueError, "same length"),
    (M.ResNet, {"widths": (), "blocks": ()}, TypeError, "widths must be a non-empty sequence"),
    (M.ResNet, {"widths": (2, -1), "blocks": (1, 1)}, ValueError, r"widths\[1\] must be >= 1"),
    (M.vit, {"image_size": 30}, ValueError, "image_size=30 must be divisible by patch_size=4"),
    (M.vit, {"dim": 10}, ValueError, "dim=10 must be divisible by heads=3"),
    (M.vit, {"mlp_ratio": 0}, ValueError, "mlp_ratio must be a finite number > 0.0, got 0"),
    (M.ViT, {"activation": "tanh"}, ValueError, "activation must be one of 'gelu', 'relu'"),
    (M.gpt, {"dim": 10, "heads": 4}, ValueError, "dim=10 must be divisible by heads=4"),
    (M.gpt, {"vocab_size": None}, TypeError, "vocab_size must be an integer, got NoneType"),
    (M.gpt, {"depth": 0}, ValueError, "depth must be >= 1, got 0"),
    (M.gpt, {"mlp_ratio": "4"}, TypeError, "mlp_ratio must be a number, got str '4'"),
    (M.hf_gpt2, {"attn_implementation": "flash"}, ValueError, "attn_implementation must be one"),
    (M.hf_gpt2, {"vocab_size": 1}, ValueError, "vocab_size must be >= 2, got 1"),
    (M.image_data, {"num_classes": 1}, ValueError, "num_classes must be >= 2, got 1"),
    (M.lm_sequences, {"min_len": 7, "max_len": 6}, ValueError, "min_len=7 must be <= max_len=6"),
    (M.lm_batches, {"sizes": (3, 0)}, ValueError, r"sizes\[1\] must be >= 1, got 0"),
]


@pytest.mark.parametrize("factory, kwargs, exc, match", BAD,
                         ids=[f"{f.__name__}-{next(iter(k))}" for f, k, _, _ in BAD])
def test_bad_arguments(factory, kwargs, exc, match):
    with pytest.raises(exc, match=match) as info:
        factory(**kwargs)
    assert "\n" not in str(info.value)


def test_hf_gpt2_without_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    with pytest.raises(ImportError, match=r"pip install msam-landscape\[huggingface\]"):
        M.hf_gpt2()
    import tomllib  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "msam-landscape"
    assert any(r.startswith("transformers")
               for r in project["optional-dependencies"]["huggingface"])


def test_importing_the_models_does_not_import_transformers():
    code = "import sys, landscape.models; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""}, check=True)
    assert out.stdout.strip() == "False"
