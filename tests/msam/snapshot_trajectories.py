"""Bit-identity check for refactors of msam (not a test; run by hand before and after).

    python tests/msam/snapshot_trajectories.py save before.pt     # on the old code
    python tests/msam/snapshot_trajectories.py save after.pt      # on the new code
    python tests/msam/snapshot_trajectories.py compare before.pt after.pt

Runs every optimizer configuration (MSAM with/without weight decay, negative and zero rho, the
ladder, NAG, AdamW-MSAM, SAM/ASAM; both foreach paths; two parameter groups with parameters
that have no gradient on odd steps, interleaved, and one that never has one; an eval/train and
state-dict round trip and an lr change mid-way) for 50 steps, saving the weights after every
step and the final optimizer state; ``compare`` checks every tensor with torch.equal.
"""
import sys

import torch
import torch.nn.functional as F
from torch import nn

from msam import MSAM, NAG, SAM, AdamWMSAM

STEPS = 50

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)
        self.side = nn.Linear(8, 3)      # used on even steps only -> no grad on odd steps
        self.frozen = nn.Linear(3, 3)    # never used -> never a grad
    def forward(self, x, t):
        h = torch.tanh(self.a(x))
        out = self.b(h)
        if t % 2 == 0:
            out = out + self.side(h)
        return out

def groups(m, **g2):
    return [{"params": list(m.a.parameters()) + list(m.frozen.parameters())},
            {"params": [m.b.weight, m.side.weight, m.b.bias, m.side.bias], **g2}]  # idle params interleaved

def configs():
    for fe in (False, True):
        yield f"msam-fe{fe}", lambda m, fe=fe: MSAM(groups(m, lr=0.05, rho=1.0), lr=0.1, rho=0.5, foreach=fe)
        yield f"msam-wd-fe{fe}", lambda m, fe=fe: MSAM(groups(m, weight_decay=1e-3), lr=0.1, rho=0.5, weight_decay=1e-2, foreach=fe)
        yield f"msam-neg-fe{fe}", lambda m, fe=fe: MSAM(groups(m), lr=0.1, rho=-0.3, foreach=fe)
        yield f"msam-rho0-fe{fe}", lambda m, fe=fe: MSAM(groups(m), lr=0.1, rho=0.0, weight_decay=1e-3, foreach=fe)
        for norm in (True, False):
            for sbl in (True, False):
                yield (f"ladder-n{norm}-s{sbl}-fe{fe}",
                       lambda m, norm=norm, sbl=sbl, fe=fe: MSAM(groups(m, rho=0.7), lr=0.1, rho=0.9, weight_decay=1e-3,
                                                          normalize=norm, scale_by_lr=sbl, foreach=fe))
        yield f"nag-fe{fe}", lambda m, fe=fe: NAG(groups(m, momentum=0.8), lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=fe)
        yield f"adamw-msam-fe{fe}", lambda m, fe=fe: AdamWMSAM(groups(m, rho=0.3, lr=2e-3), lr=1e-2, rho=0.5, foreach=fe)
        yield f"adamw-msam-nowd-fe{fe}", lambda m, fe=fe: AdamWMSAM(groups(m), lr=1e-2, rho=0.5, weight_decay=0.0, foreach=fe)
        yield f"adamw-msam-rho0-fe{fe}", lambda m, fe=fe: AdamWMSAM(groups(m), lr=1e-2, rho=0.0, foreach=fe)
    yield "sam-sgd", lambda m: SAM(groups(m, rho=0.1), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, weight_decay=1e-3)
    yield "asam-sgd", lambda m: SAM(groups(m), "sgd", rho=0.5, adaptive=True, lr=0.1, momentum=0.9)
    yield "sam-adamw", lambda m: SAM(groups(m), "adamw", rho=0.05, lr=1e-2)

def run(name, make):
    torch.manual_seed(0)
    m = Net().double() if "f64" in name else Net()
    opt = make(m)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(5)]
    record = []
    for t in range(STEPS):
        x, y = data[t % 5]
        if isinstance(opt, SAM):
            def closure(x=x, y=y, t=t):
                loss = F.cross_entropy(m(x, t), y)
                loss.backward()
                return loss.detach()

            opt.step(closure, model=m)
        else:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x, t), y).backward()
            opt.step()
            if t == 20:  # eval/train round trip and a state-dict round trip, lr edit
                opt.eval()
                opt.train()
                opt.load_state_dict(opt.state_dict())
                for gr in opt.param_groups:
                    gr["lr"] = gr["lr"] * 0.5
            if t == 30:
                with opt.unperturbed():
                    record.append([p.detach().clone() for p in m.parameters()])
        record.append([p.detach().clone() for p in m.parameters()])
    return {"weights": record, "state": opt.state_dict()}

def compare(pa, pb):
    a, b = torch.load(pa, weights_only=False), torch.load(pb, weights_only=False)
    def eq(x, y, path):
        if isinstance(x, torch.Tensor):
            ok = isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
            if not ok:
                print("DIFF", path)
            return int(ok), 1
        if isinstance(x, dict):
            assert isinstance(y, dict) and set(x) == set(y), (path, set(x) ^ set(y))
            r = [eq(x[k], y[k], f"{path}/{k}") for k in x]
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), path
            r = [eq(u, v, f"{path}[{i}]") for i, (u, v) in enumerate(zip(x, y))]
        else:
            if x != y:
                print("DIFF", path, x, y)
                return 0, 1
            return 1, 1
        return sum(o for o, _ in r), sum(n for _, n in r)
    assert set(a) == set(b)
    tot_ok = tot = 0
    for k in a:
        ok, n = eq(a[k], b[k], k)
        tot_ok += ok
        tot += n
        print(f"{k:32s} {ok}/{n} equal")
    print(f"TOTAL {tot_ok}/{tot} equal over {len(a)} configs")
    return tot_ok == tot


if __name__ == "__main__":
    if sys.argv[1] == "save":
        out = {name: run(name, make) for name, make in configs()}
        torch.save(out, sys.argv[2])
        print(len(out), "configs saved to", sys.argv[2])
    else:
        sys.exit(0 if compare(sys.argv[2], sys.argv[3]) else 1)
