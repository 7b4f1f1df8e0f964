"""Functions run on every rank by :func:`tests.distributed.launcher.run_ranks`.

Each group of checks shares one spawn (spawned ranks import torch, which is the slow part).
A check records ``("ok", value)`` or ``("error", traceback)`` so that one missing module does not
hide the others; ``("missing", message)`` marks code that has not landed (ImportError).
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from analysis import distributed as D


def _run_checks(checks: dict[str, Callable[[], Any]]) -> dict[str, tuple[str, Any]]:
    out: dict[str, tuple[str, Any]] = {}
    for name, check in checks.items():
        try:
            out[name] = ("ok", check())
        except ImportError as e:  # code not landed yet
            out[name] = ("missing", f"{type(e).__name__}: {e}")
        except Exception:  # noqa: BLE001 - reported by the test that reads it
            out[name] = ("error", traceback.format_exc())
        # keep the ranks in step even if one check failed on one rank only
        D.barrier()
    return out


# --------------------------------------------------------------------------- failures


def raise_on_rank_one(rank: int, world: int) -> float:
    """Rank 1 raises at once; rank 0 enters an all-reduce that rank 1 never joins."""
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    t0 = time.perf_counter()
    D.all_reduce_sum(torch.ones(3))
    return time.perf_counter() - t0


def stall_on_rank_one(rank: int, world: int, stall: float) -> float:
    """Rank 1 stays alive but silent for ``stall`` s; rank 0's all-reduce must time out first."""
    if rank == 1:
        time.sleep(stall)
        return stall
    t0 = time.perf_counter()
    try:
        D.all_reduce_sum(torch.ones(3))
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"rank 0 gave up after {time.perf_counter() - t0:.1f} s") from e
    return time.perf_counter() - t0


def torchrun_session(rank: int, world: int) -> dict[str, Any]:
    """Run inside a torchrun-like environment: the process group comes from init_from_env."""
    import torch.distributed as dist

    with D.distributed_session(timeout=30) as active:
        x = torch.tensor([float(rank + 1)], dtype=torch.float64)
        D.all_reduce_sum(x)
        obj = D.broadcast_object({"from": D.get_rank(), "payload": [1, 2]} if rank == 0 else None)
        gathered = D.all_gather_object(rank * 10)
        D.barrier()
        inside = (active, D.is_distributed(), D.get_rank(), D.get_world_size(),
                  D.is_main_process())
        # replicated-state check: identical passes, differing raises on every rank
        D.assert_same_across_ranks(torch.arange(4, dtype=torch.float64), "same")
        try:
            D.assert_same_across_ranks(torch.full((4,), float(rank)), "differs")
            differs = None
        except RuntimeError as e:
            differs = str(e)
        # a synchronized ascent gradient is the average of the ranks' gradients
        p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        q = torch.nn.Parameter(torch.zeros(2, dtype=torch.float32))
        p.grad = torch.full((3,), float(rank + 1), dtype=torch.float64)
        q.grad = torch.full((2,), 2.0 * (rank + 1))
        D.all_reduce_gradients([p, q])
        grads = (p.grad.tolist(), q.grad.tolist())
    return {
        "inside": inside, "sum": x.item(), "obj": obj, "gathered": gathered,
        "differs": differs, "grads": grads, "after": dist.is_initialized(),
    }


# --------------------------------------------------------------------------- analysis


# --------------------------------------------------------------------------- shared data

N_SAMPLES, BATCH = 50, 8  # 7 batches, the last one of 2 samples: uneven shards (26 / 24)


def classification_problem():
    from tests.models import classification_data, mlp

    x, y = classification_data(n=N_SAMPLES, d=6, classes=3, seed=3)
    return mlp(seed=1), x, y


# --------------------------------------------------------------------------- optimizers

GLOBAL_BATCH, STEPS = 8, 5


def _optimizer(name: str, model: torch.nn.Module):
    if name == "msam":
        from msam import MSAM

        return MSAM(model.parameters(), lr=0.1, momentum=0.9, rho=0.5, weight_decay=1e-3)
    if name == "adamw_msam":
        from msam import AdamWMSAM

        return AdamWMSAM(model.parameters(), lr=1e-2, weight_decay=1e-2, rho=0.3)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    if name in ("sam", "sam_sync"):
        from msam import SAM

        return SAM(model.parameters(), base_optimizer=torch.optim.SGD, rho=0.1, lr=0.1,
                   momentum=0.9)
    raise ValueError(name)


class _CollectiveCounter:
    """Counts Python-level collectives (all_reduce & co.) while active (monkeypatched)."""

    NAMES = ("all_reduce", "all_gather", "broadcast", "reduce_scatter", "all_reduce_coalesced",
             "all_gather_into_tensor", "reduce_scatter_tensor")

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.count, self.saved = dist, 0, {}

    def __enter__(self):
        for name in self.NAMES:
            fn = getattr(self.dist, name, None)
            if fn is None:
                continue
            self.saved[name] = fn

            def wrapped(*a, _fn=fn, **k):
                self.count += 1
                return _fn(*a, **k)

            setattr(self.dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.dist, name, fn)


def train_run(name: str, rank: int = 0, world: int = 1, checkpoint: str | None = None) -> dict:
    """``STEPS`` steps of optimizer ``name`` with a global batch of ``GLOBAL_BATCH`` samples.

    On ``world`` ranks each rank takes its contiguous ``GLOBAL_BATCH / world`` rows of the global
    batch and the model is wrapped in DistributedDataParallel (gradients averaged by DDP, so the
    step equals one process on the whole global batch). Run with ``world=1`` (no process group)
    for the reference. SAM: ``"sam"`` runs the ascent inside ``no_sync`` (per-rank ascent),
    ``"sam_sync"`` all-reduces the ascent gradient with ``all_reduce_gradients``.
    """
    import torch.nn.functional as F

    from tests.models import classification_data, mlp

    model = mlp(seed=2)
    x, y = classification_data(n=GLOBAL_BATCH * STEPS, d=6, classes=3, seed=4)
    per_rank = GLOBAL_BATCH // world
    net: torch.nn.Module = model
    hook_calls = {"n": 0}
    if world > 1:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model)

        def counting_hook(state, bucket):
            state["n"] += 1
            return default_hooks.allreduce_hook(None, bucket)

        net.register_comm_hook(hook_calls, counting_hook)
    opt = _optimizer(name, model)
    step_collectives = 0
    for i in range(STEPS):
        lo = i * GLOBAL_BATCH + rank * per_rank
        xb, yb = x[lo:lo + per_rank], y[lo:lo + per_rank]
        opt.zero_grad()
        if name in ("sam", "sam_sync"):
            ctx = net.no_sync() if world > 1 else _nullcontext()
            with ctx:  # ascent gradient: per-rank, no DDP all-reduce
                F.cross_entropy(net(xb), yb).backward()
            if name == "sam_sync":
                D.all_reduce_gradients(model)  # no-op on one process
            opt.first_step(zero_grad=True)
            F.cross_entropy(net(xb), yb).backward()  # DDP averages the descent gradient
            with _CollectiveCounter() as c:
                opt.second_step(zero_grad=True)
        else:
            F.cross_entropy(net(xb), yb).backward()
            with _CollectiveCounter() as c:
                opt.step()
        step_collectives += c.count
    out: dict[str, Any] = {
        "live": [p.detach().clone() for p in model.parameters()],
        "hook_calls": hook_calls["n"],
        "step_collectives": step_collectives,
    }
    state_key = {"msam": "momentum_buffer", "adamw_msam": "exp_avg", "sgd": "momentum_buffer"}
    if name in state_key:
        buf = torch.cat([opt.state[p][state_key[name]].reshape(-1) for p in model.parameters()])
        D.assert_same_across_ranks(buf, f"{name} {state_key[name]}")  # replicated: exact
        out["buffer"] = buf
    if hasattr(opt, "eval"):  # the MSAM family: inference weights w, from any rank
        opt.eval()
        out["eval"] = [p.detach().clone() for p in model.parameters()]
        if checkpoint is not None and rank == world - 1:  # save from the LAST rank
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint)
        opt.train()
        out["train_again"] = [p.detach().clone() for p in model.parameters()]
    return out


def continue_from_checkpoint(name: str, checkpoint: str, steps: int = 2) -> list[torch.Tensor]:
    """Load a checkpoint saved by :func:`train_run` on one process and take ``steps`` more steps
    (batch ``GLOBAL_BATCH``, new data); returns the eval() weights."""
    import torch.nn.functional as F

    from tests.models import classification_data, mlp

    model = mlp(seed=7)  # different init: everything must come from the checkpoint
    opt = _optimizer(name, model)
    ck = torch.load(checkpoint, weights_only=True)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    opt.train()
    x, y = classification_data(n=GLOBAL_BATCH * steps, d=6, classes=3, seed=5)
    for i in range(steps):
        opt.zero_grad()
        sl = slice(i * GLOBAL_BATCH, (i + 1) * GLOBAL_BATCH)
        F.cross_entropy(model(x[sl]), y[sl]).backward()
        opt.step()
    opt.eval()
    return [p.detach().clone() for p in model.parameters()]


def continue_in_place(name: str, steps: int = 2) -> list[torch.Tensor]:
    """The uninterrupted one-process reference for :func:`continue_from_checkpoint`: ``STEPS``
    steps as :func:`train_run` (world 1), ``eval()``/``train()``, then ``steps`` more."""
    import torch.nn.functional as F

    from tests.models import classification_data, mlp

    model = mlp(seed=2)
    opt = _optimizer(name, model)
    for seed, n in ((4, STEPS), (5, steps)):
        x, y = classification_data(n=GLOBAL_BATCH * n, d=6, classes=3, seed=seed)
        for i in range(n):
            opt.zero_grad()
            sl = slice(i * GLOBAL_BATCH, (i + 1) * GLOBAL_BATCH)
            F.cross_entropy(model(x[sl]), y[sl]).backward()
            opt.step()
        opt.eval()
        opt.train()
    opt.eval()
    return [p.detach().clone() for p in model.parameters()]


def sam_reference(sync: bool, world: int = 2) -> list[torch.Tensor]:
    """Hand-written SAM under DDP on one process: SGD with momentum (lr 0.1, mu 0.9) on
    ``mean_r grad L_r(w + e_r)``, ``e_r = rho g_r / ||g_r||`` with ``g_r`` rank ``r``'s batch
    gradient (per-rank ascent), or ``e = rho g / ||g||`` with the global-batch ``g`` (sync)."""
    import torch.nn.functional as F

    from tests.models import classification_data, mlp

    rho, lr, mu = 0.1, 0.1, 0.9
    model = mlp(seed=2)
    params = list(model.parameters())
    x, y = classification_data(n=GLOBAL_BATCH * STEPS, d=6, classes=3, seed=4)
    per_rank = GLOBAL_BATCH // world
    bufs = [torch.zeros_like(p) for p in params]

    def grad_at(w_shift, xb, yb):
        with torch.no_grad():
            for p, e in zip(params, w_shift):
                p.add_(e)
        g = torch.autograd.grad(F.cross_entropy(model(xb), yb), params)
        with torch.no_grad():
            for p, e in zip(params, w_shift):
                p.sub_(e)
        return g

    zero = [torch.zeros_like(p) for p in params]
    for i in range(STEPS):
        chunks = [(x[i * GLOBAL_BATCH + r * per_rank:i * GLOBAL_BATCH + (r + 1) * per_rank],
                   y[i * GLOBAL_BATCH + r * per_rank:i * GLOBAL_BATCH + (r + 1) * per_rank])
                  for r in range(world)]
        asc = [grad_at(zero, xb, yb) for xb, yb in chunks]
        if sync:
            g = [sum(gs) / world for gs in zip(*asc)]
            asc = [g] * world
        descent = []
        for (xb, yb), g in zip(chunks, asc):
            norm = torch.sqrt(sum((t * t).sum() for t in g))
            descent.append(grad_at([rho * t / norm for t in g], xb, yb))
        g2 = [sum(gs) / world for gs in zip(*descent)]
        with torch.no_grad():
            for p, b, g in zip(params, bufs, g2):
                b.mul_(mu).add_(g)
                p.sub_(lr * b)
    return [p.detach().clone() for p in params]


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def optimizer_checks(rank: int, world: int, checkpoint_dir: str) -> dict:
    """Every optimizer check on one spawn."""
    names = ("sgd", "msam", "adamw_msam", "sam", "sam_sync")
    return _run_checks({
        n: (lambda n=n: train_run(n, rank, world, f"{checkpoint_dir}/{n}.pt")) for n in names
    })


# --------------------------------------------------------------------------- analysis


def _sharded(x, y, batch_size=BATCH):
    from analysis.data import as_data

    return as_data((x, y), batch_size=batch_size, shard=True)


def analysis_values(rank: int, world: int, store_dir: str | None = None) -> dict:
    """Every sharded analysis quantity on this rank's share of the same 50-sample dataset.

    Called on 2 ranks (each sees its batches: 26 and 24 samples) and, as the reference, on one
    process without a process group (``shard=True`` then yields every batch). The values must
    agree to rounding (float64). Collectives are counted per matvec.
    """
    model, x, y = classification_problem()
    torch.manual_seed(100)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)

    def evaluate_check():
        from analysis import evaluate

        r = evaluate(model, "cross_entropy", _sharded(x, y))
        return {"loss": r.loss, "accuracy": r.accuracy, "num_samples": r.num_samples}

    def hvp_check():
        from analysis import HessianOperator

        op = HessianOperator(model, "cross_entropy", _sharded(x, y))
        with _CollectiveCounter() as c:
            hv = [op @ v for _ in range(3)]
        return {"hv": hv[0], "repeat": torch.equal(hv[0], hv[2]), "collectives": c.count,
                "num_samples": op.num_samples}

    def hvp_loader_check():
        from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

        from analysis import HessianOperator
        from analysis.data import as_data

        ds = TensorDataset(x, y)
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
        loader = DataLoader(ds, batch_size=BATCH, sampler=sampler)
        op = HessianOperator(model, "cross_entropy", as_data(loader, shard=True))
        first = op @ v  # counts N on the first pass (one extra all-reduce)
        with _CollectiveCounter() as c:
            second = op @ v
        return {"hv": first, "repeat": torch.equal(first, second), "collectives": c.count}

    def eig_check():
        from analysis import HessianOperator, top_eigenpairs

        op = HessianOperator(model, "cross_entropy", _sharded(x, y))
        with _CollectiveCounter() as c:
            res = top_eigenpairs(op, k=5, tol=1e-10, seed=0)
        # the Lanczos basis is replicated: the Ritz vectors agree bit for bit on every rank
        D.assert_same_across_ranks(res.eigenvectors, "Ritz vectors")
        return {"eigenvalues": res.eigenvalues, "eigenvectors": res.eigenvectors,
                "num_matvecs": res.num_matvecs, "collectives": c.count,
                "converged": res.converged, "data_stderr": res.data_stderr,
                "stderr_matvecs": res.data_sampling.matvecs}

    def trace_check():
        from analysis import HessianOperator, hessian_trace

        # a batched method: one pass (one all-reduce) per block of probes; "auto" may pick the
        # cached graph, which loops the columns (one all-reduce per product)
        op = HessianOperator(model, "cross_entropy", _sharded(x, y), method="forward-over-reverse")
        out = {}
        for method in ("hutchinson", "hutch++"):
            before = op.num_matvecs
            with _CollectiveCounter() as c:
                r = hessian_trace(op, num_matvecs=30, method=method, seed=0)
            out[method] = {"result": _plain(r), "collectives": c.count,
                           "matvecs": op.num_matvecs - before}
        return out

    def cached_block_check():
        from analysis import HessianOperator

        op = HessianOperator(model, "cross_entropy", _sharded(x, y), method="cached-graph")
        V = torch.stack([v, torch.roll(v, 1), torch.roll(v, 2), torch.roll(v, 3)], 1)
        with _CollectiveCounter() as c:
            hv = op.matmat(V, block_size=4)  # the cached graph loops the columns in each batch
        return {"hv": hv, "collectives": c.count, "matvecs": op.num_matvecs}

    def density_check():
        from analysis import HessianOperator, spectral_density

        op = HessianOperator(model, "cross_entropy", _sharded(x, y))
        return _plain(spectral_density(op, num_iter=20, num_runs=2, seed=0))

    def sharpness_worst_check():
        from analysis import sharpness

        r = sharpness(model, "cross_entropy", _sharded(x, y), kind="worst", rho=0.05, m=BATCH,
                      n_eval=None, steps=5, init="zero", progress=False)
        return {"value": r.value, "loss": r.loss, "num_batches": r.num_batches}

    def sharpness_worst_random_check():
        from analysis import sharpness

        r = sharpness(model, "cross_entropy", _sharded(x, y), kind="worst", rho=0.05, m=BATCH,
                      n_eval=None, steps=3, init="random", seed=0, progress=False)
        return {"value": r.value, "loss": r.loss, "num_batches": r.num_batches}

    def sharpness_average_check():
        from analysis import sharpness

        r = sharpness(model, "cross_entropy", _sharded(x, y), kind="average", rho=0.05,
                      m=BATCH, n_eval=None, samples=4, seed=0, progress=False)
        return {"value": r.value, "loss": r.loss, "num_batches": r.num_batches}

    def directional_check():
        from analysis import directional_sharpness

        r = directional_sharpness(model, "cross_entropy", _sharded(x, y), v, [-0.5, 0.2, 1.0])
        return _plain(r)

    def epsilon_check():
        from analysis import epsilon_sharpness

        r = epsilon_sharpness(model, "cross_entropy", _sharded(x, y), epsilon=1e-2,
                              method="apgd", steps=3, seed=0)
        return _plain(r)

    def slice_1d_check():
        from landscape import slice_1d

        r = slice_1d(model, "cross_entropy", _sharded(x, y), v, [-0.5, 0.0, 0.5], progress=False)
        return {"loss": r.loss, "accuracy": r.accuracy}

    def slice_2d_check():
        from landscape import slice_2d

        d2 = torch.roll(v, 1)
        with _CollectiveCounter() as c:
            r = slice_2d(model, "cross_entropy", _sharded(x, y), v, d2, [-0.5, 0.0, 0.5, 1.0],
                         [-1.0, 0.25, 1.0], progress=False)
        return {"loss": r.loss, "accuracy": r.accuracy, "num_samples": r.num_samples,
                "collectives": c.count}

    def slice_2d_store_check():
        from landscape import slice_2d

        if store_dir is None:
            return None
        path = os.path.join(store_dir, "grid.npz")
        d2 = torch.roll(v, 1)
        r = slice_2d(model, "cross_entropy", _sharded(x, y), v, d2, [-0.5, 0.5], [-1.0, 1.0],
                     store=path, progress=False)
        D.barrier()
        again = slice_2d(model, "cross_entropy", _sharded(x, y), v, d2, [-0.5, 0.5], [-1.0, 1.0],
                         store=path, progress=False)  # resumes: every row is done
        return {"loss": r.loss, "again": again.loss, "resumed_rows": again.resumed_rows}

    checks = {
        "evaluate": evaluate_check, "hvp": hvp_check, "hvp_loader": hvp_loader_check,
        "eig": eig_check, "trace": trace_check, "density": density_check,
        "cached_block": cached_block_check,
        "sharpness_worst": sharpness_worst_check, "sharpness_average": sharpness_average_check,
        "sharpness_worst_random": sharpness_worst_random_check,
        "directional": directional_check, "epsilon": epsilon_check,
        "slice_1d": slice_1d_check, "slice_2d": slice_2d_check,
        "slice_2d_store": slice_2d_store_check,
    }
    return _run_checks(checks)


def one_batch_values(rank: int, world: int) -> dict:
    """Fewer batches than ranks: the data is one batch, so rank 1 holds no sample and must still
    take part in every all-reduce (with zero sums). Own spawn: a rank that fails here leaves the
    other one waiting in a collective until the timeout."""
    from analysis import HessianOperator, evaluate

    model, x, y = classification_problem()
    torch.manual_seed(100)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    from analysis import directional_sharpness
    from landscape import slice_1d

    data = _sharded(x, y, batch_size=None)
    r = evaluate(model, "cross_entropy", data)
    out = {"loss": r.loss, "num_samples": r.num_samples}
    out["slice"] = slice_1d(model, "cross_entropy", data, v, [-0.5, 0.5], progress=False).loss
    out["directional"] = directional_sharpness(model, "cross_entropy", data, v, [0.5]).values
    op = HessianOperator(model, "cross_entropy", data)  # last: fails today on rank 1
    out["hv"] = op @ v
    return out


def _plain(result: Any) -> Any:
    """A result object as a dict of plain values (tensors kept), for comparison."""
    import dataclasses

    if dataclasses.is_dataclass(result):
        return {f.name: getattr(result, f.name) for f in dataclasses.fields(result)
                if not f.name.startswith(("seconds", "time"))}
    return result


# --------------------------------------------------------------------------- the CLI


def cli_hessian(rank: int, world: int, checkpoint: str, out_json: str) -> dict:
    """``landscape hessian`` as torchrun would run it; returns the exit code and stdout."""
    import contextlib
    import io

    from landscape.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main([
            "hessian", checkpoint, "--model", "tests.distributed.cli_net:build",
            "--data", "tests.distributed.cli_net:data", "--batch-size", str(BATCH),
            "--dtype", "float64", "--top-k", "3", "--tol", "1e-8", "--json", out_json, "--quiet",
        ])
    import torch.distributed as dist

    return {"code": code, "stdout": buf.getvalue(), "initialized_after": dist.is_initialized()}
