"""A model and data that this repository does not define, named by the CLI tests as
``tests.landscape.cli_fixtures:function`` or ``path/to/cli_fixtures.py:function``.

Also a few broken specs (wrong return type, raising factory, data of the wrong shape).
"""

import torch
from torch import nn

FEATURES = 7
CLASSES = 3


class GatedNet(nn.Module):
    """A small gated-residual network on 7 features (nothing like the repo's digits models)."""

    def __init__(self, hidden: int = 6):
        super().__init__()
        self.inp = nn.Linear(FEATURES, hidden)
        self.gate = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + torch.sigmoid(self.gate(h)) * h
        return self.head(self.norm(h))


def model() -> nn.Module:
    torch.manual_seed(0)
    return GatedNet()


def model_wide() -> nn.Module:
    """Same layers, other widths: checkpoints of ``model`` do not fit it."""
    return GatedNet(hidden=8)


def model64() -> nn.Module:
    return model().double()


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, FEATURES, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


def loader():
    x, y = data()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


def batches():
    x, y = data()
    return [(x[i:i + 40], y[i:i + 40]) for i in range(0, len(y), 40)]


def trained_state(steps: int = 30) -> dict:
    """A few SGD steps so the checkpoints are not at initialization."""
    net = model()
    x, y = data()
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.state_dict()


def not_a_model():
    return {"weights": 1}


def raising_model():
    raise RuntimeError("cannot build the model today")


def wrong_shape_data():
    return torch.randn(10, FEATURES + 2), torch.zeros(10, dtype=torch.long)


def mse_targets():
    x, _ = data()
    return x, torch.randn(len(x), CLASSES)


def my_loss(out, y):
    return nn.functional.cross_entropy(out, y, label_smoothing=0.1)
