import pytest
import torch
from torch import nn

from analysis import ParameterSpace, flatten, unflatten
from tests.models import TiedFrozen, cnn_bn, mlp


def test_flatten_unflatten_roundtrip():
    ts = [torch.randn(2, 3), torch.randn(4), torch.randn(1, 1, 2)]
    v = flatten(ts)
    assert v.shape == (12,)
    back = unflatten(v, [t.shape for t in ts])
    for a, b in zip(ts, back):
        assert torch.equal(a, b)


def test_unflatten_rejects_wrong_length():
    with pytest.raises(ValueError, match="length 6"):
        unflatten(torch.zeros(5), [torch.Size([2, 3])])


def test_space_order_and_vector_matches_parameters():
    model = mlp()
    space = ParameterSpace(model)
    assert space.names == [n for n, _ in model.named_parameters()]
    ref = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(space.vector(), ref)
    assert space.numel == ref.numel()
    assert space.dtype == torch.float64


def test_tied_once_and_frozen_skipped():
    model = TiedFrozen()
    space = ParameterSpace(model)
    assert space.names == ["shared.weight", "shared.bias", "head.weight", "head.bias"]
    # explicit selection may include a frozen parameter
    space2 = ParameterSpace(model, params=["frozen.weight"])
    assert space2.numel == 25


def test_add_and_restore_are_exact():
    model = cnn_bn()
    space = ParameterSpace(model)
    before = [p.detach().clone() for p in model.parameters()]
    d = torch.randn(space.numel, dtype=torch.float64)
    with space.restored():
        space.add_(d, alpha=0.3)
        assert torch.allclose(space.vector(), torch.cat([b.reshape(-1) for b in before]) + 0.3 * d)
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p)


def test_restored_survives_exceptions():
    model = mlp()
    space = ParameterSpace(model)
    w = space.vector()
    with pytest.raises(KeyboardInterrupt):
        with space.restored():
            space.add_(torch.ones(space.numel, dtype=torch.float64))
            raise KeyboardInterrupt
    assert torch.equal(space.vector(), w)


def test_errors_are_clear():
    lin = nn.Linear(2, 2)
    lin.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ParameterSpace(lin)
    with pytest.raises(ValueError, match="unknown parameter name 'nope'"):
        ParameterSpace(mlp(), params=["nope"])
    with pytest.raises(TypeError, match="nn.Module"):
        ParameterSpace("model")  # type: ignore[arg-type]
    space = ParameterSpace(mlp())
    with pytest.raises(ValueError, match=r"expected \(" + str(space.numel)):
        space.check_vector(torch.zeros(3))
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match="several dtypes"):
        ParameterSpace(mixed)


def test_grad_vector_zero_for_missing_grads():
    model = mlp()
    space = ParameterSpace(model)
    assert torch.equal(space.grad_vector(), torch.zeros(space.numel, dtype=torch.float64))


def test_writes_and_types_are_checked():
    # issue 15 item 14: copy_(numpy) gave an AttributeError, an integer vector was cast silently
    import numpy as np

    model = mlp()
    space = ParameterSpace(model)
    w = space.vector()
    with pytest.raises(TypeError, match=r"copy_\(\) needs a flat torch.Tensor, got ndarray \(convert"):
        space.copy_(np.zeros(space.numel))
    with pytest.raises(TypeError, match=r"add_\(\) needs a flat torch.Tensor, got list"):
        space.add_([0.0] * space.numel)
    with pytest.raises(TypeError, match="floating-point vector, got dtype torch.int64"):
        space.copy_(torch.zeros(space.numel, dtype=torch.long))
    with pytest.raises(TypeError, match="alpha must be a number, got str"):
        space.add_(torch.zeros(space.numel, dtype=torch.float64), alpha="2")
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        space.copy_(torch.zeros(3, dtype=torch.float64))
    assert torch.equal(space.vector(), w)  # nothing was written
    with pytest.raises(TypeError, match="got the string '0.weight'"):
        ParameterSpace(model, "0.weight")
    with pytest.raises(TypeError, match="got int"):
        ParameterSpace(model, 3)
    with pytest.raises(TypeError, match="iterable of tensors, got NoneType"):
        flatten(None)
    with pytest.raises(TypeError, match="needs tensors, got list"):
        flatten([[1.0]])
    with pytest.raises(TypeError, match=r"unflatten\(\) needs a torch.Tensor, got ndarray"):
        unflatten(np.zeros(3), [torch.Size([3])])
    with pytest.raises(TypeError, match="shapes must be a sequence of shapes, got NoneType"):
        unflatten(torch.zeros(3), None)
