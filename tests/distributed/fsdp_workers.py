"""The MSAM family and SAM/ASAM on FSDP2-sharded models: functions run on every rank.

The same function runs on one process without a process group (``world == 1``, the model not
sharded) for the reference, so the two runs share every line but the sharding. Each rank takes
its contiguous ``GLOBAL_BATCH / world`` rows of every global batch; FSDP2 reduce-scatters the
average gradient, so a step on 2 ranks is a step on the global batch.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from tests.distributed.workers import _run_checks

GLOBAL_BATCH, STEPS, MORE = 8, 20, 5
OPTIMIZERS = ("msam", "adamw_msam", "sam", "asam")
FOREACH = ("msam-foreach", "adamw_msam-foreach")  # the torch._foreach kernels on DTensors


def make_model(seed: int = 2) -> torch.nn.Module:
    """float64, 7 hidden units and 3 classes: every tensor splits unevenly over 2 ranks."""
    from tests.models import mlp

    return mlp(d=6, hidden=7, classes=3, seed=seed)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: each Linear its own group, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def make_optimizer(name: str, model: torch.nn.Module):
    name, _, variant = name.partition("-")
    foreach = True if variant == "foreach" else None
    if name == "msam":
        from msam import MSAM

        return MSAM(model.parameters(), lr=0.1, momentum=0.9, rho=0.5, weight_decay=1e-3,
                    foreach=foreach)
    if name == "adamw_msam":
        from msam import AdamWMSAM

        return AdamWMSAM(model.parameters(), lr=1e-2, weight_decay=1e-2, rho=0.3,
                         foreach=foreach)
    if name in ("sam", "asam"):
        from msam import SAM

        return SAM(model.parameters(), base_optimizer=torch.optim.SGD, rho=0.1,
                   adaptive=name == "asam", lr=0.1, momentum=0.9)
    raise ValueError(name)


def full(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter as one full tensor (all-gathered when sharded)."""
    from torch.distributed.tensor import DTensor

    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for p in model.parameters()]


def train(name: str, model: torch.nn.Module, opt, rank: int, world: int, steps: int,
          seed: int) -> None:
    """``steps`` steps on this rank's rows of seeded global batches."""
    from tests.models import classification_data

    x, y = classification_data(n=GLOBAL_BATCH * steps, d=6, classes=3, seed=seed)
    per_rank = GLOBAL_BATCH // world
    for i in range(steps):
        lo = i * GLOBAL_BATCH + rank * per_rank
        xb, yb = x[lo:lo + per_rank], y[lo:lo + per_rank]
        opt.zero_grad()
        if name in ("sam", "asam"):
            # both passes are reduce-scattered: every rank ascends along the global gradient
            F.cross_entropy(model(xb), yb).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.second_step(zero_grad=True)
        else:
            F.cross_entropy(model(xb), yb).backward()
            opt.step()


def setup(name: str, world: int, seed: int = 2):
    model = make_model(seed)
    if world > 1:
        shard(model)
    return model, make_optimizer(name, model)


def run(name: str, rank: int = 0, world: int = 1, ckpt_dir: str | None = None) -> dict[str, Any]:
    """``STEPS`` steps, then eval()/train(); saves a sharded checkpoint (one file per rank) and
    the full one (rank 0) through torch.distributed.checkpoint's state-dict API."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, opt = setup(name, world)
    train(name, model, opt, rank, world, STEPS, seed=4)
    out: dict[str, Any] = {"live": full(model)}
    if hasattr(opt, "eval"):
        opt.eval()
        out["eval"] = full(model)
        opt.train()
        out["train_again"] = full(model)
    if ckpt_dir is not None:  # saved at the live (perturbed) point, as mid-training
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()},
                   os.path.join(ckpt_dir, f"{name}-sharded-{rank}.pt"))
        dcp_opt = getattr(opt, "base_optimizer", opt)
        msd, osd = get_state_dict(model, dcp_opt, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({"model": msd, "optimizer": osd}, os.path.join(ckpt_dir, f"{name}-full.pt"))
        out["after_save"] = full(model)  # saving moved nothing
    return out


def resume_sharded(name: str, rank: int, world: int, ckpt_dir: str) -> list[torch.Tensor]:
    """A fresh sharded model and optimizer (other initial weights) load this rank's files and
    take ``MORE`` steps; returns the eval() weights (w, or the live ones for SAM)."""
    model, opt = setup(name, world, seed=9)
    ck = torch.load(os.path.join(ckpt_dir, f"{name}-sharded-{rank}.pt"), weights_only=False)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    train(name, model, opt, rank, world, MORE, seed=5)
    if hasattr(opt, "eval"):
        opt.eval()
    return full(model)


def resume_full(name: str, rank: int, world: int, ckpt_dir: str) -> list[torch.Tensor]:
    """Every rank loads the full checkpoint (rank 0's file) into a fresh model, sharded on
    ``world`` ranks or plain on one process, then ``MORE`` steps; returns the eval() weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model, opt = setup(name, world, seed=9)
    ck = torch.load(os.path.join(ckpt_dir, f"{name}-full.pt"), weights_only=True)
    dcp_opt = getattr(opt, "base_optimizer", opt)
    set_state_dict(model, dcp_opt, model_state_dict=ck["model"],
                   optim_state_dict=ck["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    if hasattr(opt, "train"):
        opt.train()
    train(name, model, opt, rank, world, MORE, seed=5)
    if hasattr(opt, "eval"):
        opt.eval()
    return full(model)


def reference(name: str) -> dict[str, Any]:
    """One process, no sharding: ``STEPS`` steps, eval()/train(), then ``MORE`` (uninterrupted)."""
    model, opt = setup(name, 1)
    train(name, model, opt, 0, 1, STEPS, seed=4)
    out: dict[str, Any] = {"live": full(model)}
    if hasattr(opt, "eval"):
        opt.eval()
        out["eval"] = full(model)
        opt.train()
    train(name, model, opt, 0, 1, MORE, seed=5)
    if hasattr(opt, "eval"):
        opt.eval()
    out["resumed"] = full(model)
    return out


def optimizer_checks(rank: int, world: int, ckpt_dir: str) -> dict:
    """Every FSDP2 optimizer check on one spawn."""
    checks = {}
    for name in OPTIMIZERS:
        checks[name] = lambda n=name: run(n, rank, world, ckpt_dir)
        checks[f"{name}-resume-sharded"] = lambda n=name: resume_sharded(n, rank, world,
                                                                           ckpt_dir)
        checks[f"{name}-resume-full"] = lambda n=name: resume_full(n, rank, world, ckpt_dir)
    for name in FOREACH:
        checks[name] = lambda n=name: run(n, rank, world)
    return _run_checks(checks)


def norm_and_sync_checks(rank: int, world: int) -> dict:
    """global_norm on sharded, mixed and replicated tensors; SAM's first pass without sync."""

    def mixed_norm():
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

        from msam._perturbation import global_norm

        mesh = init_device_mesh("cpu", (world,))
        g = torch.Generator().manual_seed(0)
        a, b, c = (torch.randn(5, 3, generator=g, dtype=torch.float64),
                   torch.randn(7, generator=g, dtype=torch.float64),
                   torch.randn(4, generator=g, dtype=torch.float64))
        sharded = distribute_tensor(a, mesh, [Shard(0)])      # 3 + 2 rows
        replicated = distribute_tensor(b, mesh, [Replicate()])  # counted once, not per rank
        out = {}
        for foreach in (False, True):
            out[foreach] = {
                "sharded": global_norm([sharded], foreach=foreach),
                "mixed": global_norm([sharded, replicated, c], foreach=foreach),
                "plain": global_norm([c], foreach=foreach),
            }
        out["expected"] = {"sharded": torch.linalg.vector_norm(a),
                           "mixed": torch.cat([a.reshape(-1), b, c]).norm(),
                           "plain": c.norm()}
        out["types"] = sorted({type(v).__name__ for v in out[False].values()})
        return out

    def sam_without_sync():
        model, opt = setup("sam", world)
        from tests.models import classification_data

        x, y = classification_data(n=4, d=6, classes=3, seed=4)
        model.set_requires_gradient_sync(False)
        F.cross_entropy(model(x), y).backward()
        before = full(model)
        try:
            opt.first_step()
        except RuntimeError as e:
            return {"error": str(e), "moved": any(not torch.equal(a, b)
                                                  for a, b in zip(before, full(model)))}
        return {"error": None}

    def nan_in_one_shard():
        """A sharded state dict whose momentum has a NaN in rank 1's shard only: every rank
        refuses it (before, rank 0 loaded it and went on alone)."""
        from torch.distributed.tensor import DTensor

        model, opt = setup("msam", world)
        train("msam", model, opt, rank, world, 2, seed=4)
        sd = opt.state_dict()
        buf = sd["state"][0]["momentum_buffer"]
        if rank == world - 1:
            (buf.to_local() if isinstance(buf, DTensor) else buf).view(-1)[0] = float("nan")
        fresh_model, fresh = setup("msam", world, seed=9)
        try:
            fresh.load_state_dict(sd)
        except ValueError as e:
            return {"error": str(e), "loaded": bool(fresh.state)}
        return {"error": None, "loaded": bool(fresh.state)}

    def fingerprint():
        """The fingerprint of a sharded model is that of its full weights, equal on all ranks."""
        from analysis.distributed import check_same_weights, weights_fingerprint

        model = shard(make_model())
        check_same_weights(model)
        return weights_fingerprint(model)

    def collectives():
        """DTensor collectives inside the optimizer: one all-reduce (the norm) per step, per
        first_step of SAM, and per train() (the norm again); none in eval()."""
        from torch.distributed.tensor.debug import CommDebugMode

        from tests.models import classification_data

        x, y = classification_data(n=GLOBAL_BATCH, d=6, classes=3, seed=4)
        xb, yb = x[rank::world], y[rank::world]
        out = {}
        for name in ("msam", "adamw_msam", "sam"):
            model, opt = setup(name, world)
            counts = {}
            for _ in range(2):  # the second step has a non-zero direction everywhere
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                with CommDebugMode() as c:
                    if name == "sam":
                        opt.first_step(zero_grad=True)
                    else:
                        opt.step()
                counts["step"] = c.get_total_counts()
                if name == "sam":
                    F.cross_entropy(model(xb), yb).backward()
                    opt.second_step()
            if name != "sam":
                for what in ("eval", "train"):
                    with CommDebugMode() as c:
                        getattr(opt, what)()
                    counts[what] = c.get_total_counts()
            out[name] = counts
        return out

    return _run_checks({"mixed_norm": mixed_norm, "sam_without_sync": sam_without_sync,
                        "nan_in_one_shard": nan_in_one_shard, "fingerprint": fingerprint,
                        "collectives": collectives})
