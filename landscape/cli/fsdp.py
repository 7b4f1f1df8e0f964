"""``--fsdp``: analyze a checkpoint's model sharded with FSDP2 (``fully_shard``) under torchrun.

``torchrun --nproc_per_node N -m landscape hessian model.pt ... --fsdp`` loads the checkpoint on
every rank, shards the model with ``torch.distributed.fsdp.fully_shard`` and runs the analysis on
the shards: every rank keeps ``1/N`` of the weights, of the gradients and of every Lanczos vector
(the products are finite differences of FSDP2's gradients, the inner products all-reduced), and
each rank takes its share of the data, as without ``--fsdp``.

The sharding policy (:func:`shard_policy`): one FSDP2 group per block of the model's largest
stack of identical blocks (an ``nn.ModuleList`` / ``nn.Sequential`` of at least two children of
one class holding parameters: each transformer layer of a Hugging Face or causal-LM model,
``transformer.h.0``, ``model.layers.0``, ...), then the root module (embeddings, final norm, head).
A model without such a stack is one group, the root. A forward then all-gathers one block at a
time, so a rank holds the full weights of one block at most, beside its shards; every group,
the root too, reshards after its forward (``reshard_after_forward=True``: FSDP2's default
keeps the root unsharded after a forward without backward, which would leave plain tensors as
its parameters).

``--fsdp`` takes ``on`` (the default when given without a value), ``auto`` or ``off`` (the
default): ``auto`` shards when the command runs under torchrun with two or more processes and
the one-process memory estimate exceeds the memory available (the memory check of
:mod:`landscape.cli.memory`); otherwise it runs unsharded (data parallel).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import TYPE_CHECKING, Any

from ._common import CLIError, UsageError
from ._common import first_line as _first_line
from .output import Ctx

if TYPE_CHECKING:
    from analysis import Data

__all__ = ["FSDP_CHOICES", "add_fsdp_option", "apply_fsdp", "check_fsdp_batches", "plan_fsdp",
           "shard_policy", "sharded_model"]

#: The values of ``--fsdp``.
FSDP_CHOICES = ("off", "on", "auto")


def add_fsdp_option(p: argparse.ArgumentParser, supported: str = "") -> None:
    """``--fsdp [on|auto|off]`` on subcommand ``p``; ``supported`` says what runs sharded."""
    p.add_argument("--fsdp", nargs="?", const="on", default="off", choices=FSDP_CHOICES,
                   metavar="WHEN",
                   help="under torchrun: shard the model with FSDP2 (fully_shard: each "
                        "transformer block, then the root), so that every rank holds 1/N of the "
                        "weights and vectors; 'auto' shards only when the one-process memory "
                        "estimate exceeds the memory available" + supported + " (default: off)")


def shard_policy(model: Any) -> list[Any]:
    """The modules :func:`apply_fsdp` shards, inner first: the blocks of the model's largest
    stack of identical blocks (an ``nn.ModuleList`` or ``nn.Sequential`` of at least two
    children, all of one class and holding parameters; the stack with the most parameters),
    then ``model`` itself."""
    from torch import nn

    best, best_size = [], 0
    for m in model.modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        kids = list(m.children())
        if len(kids) < 2 or len({type(k) for k in kids}) != 1:
            continue
        sizes = [sum(p.numel() for p in k.parameters()) for k in kids]
        if min(sizes) == 0:
            continue
        if sum(sizes) > best_size:
            best, best_size = kids, sum(sizes)
    return [*best, model]


def apply_fsdp(model: Any, ctx: Ctx) -> Any:
    """Shard ``model`` in place with ``fully_shard`` on the modules of :func:`shard_policy` over
    all ranks (a 1-D device mesh of the model's device type) and return it; every rank must
    call it. Logs the groups and this rank's share.

    Raises:
        UsageError: not under torchrun with two or more processes.
        RanksFailed: ``fully_shard`` failed on some rank (e.g. a scalar parameter), naming the
            ranks and the cause.
    """
    from analysis import distributed as dist
    from analysis.evaluation import model_device_dtype
    from analysis.shards import is_dtensor

    if not ctx.distributed:
        raise UsageError("--fsdp shards the model over torchrun's processes: launch with "
                         "torchrun --nproc_per_node N -m landscape ... (N >= 2), or leave --fsdp out")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    modules = shard_policy(model)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with dist.all_ranks_succeed("sharding the model with FSDP2 (--fsdp)"):
        device, _ = model_device_dtype(model)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        try:
            for m in modules:  # also the root: left to its default, the root keeps its
                # full weights after a forward without backward (a loss, a slice), and its
                # parameters are then plain tensors until the next backward
                fully_shard(m, mesh=mesh, reshard_after_forward=True)
        except Exception as exc:
            raise CLIError(f"fully_shard cannot shard {type(model).__name__}: "
                           f"{_first_line(exc)}") from exc
    local = sum(p.to_local().numel() for p in model.parameters()
                if p.requires_grad and is_dtensor(p))
    blocks = len(modules) - 1
    ctx.log(f"--fsdp: {blocks} block{'s' if blocks != 1 else ''} and the root sharded over "
            f"{dist.get_world_size()} ranks (FSDP2); rank 0 holds {local} of {total} parameters")
    if device.type == "cpu":
        _fix_host_memory(ctx)
    return model


def _fix_host_memory(ctx: Ctx) -> None:
    """Fix glibc's mmap threshold (:func:`analysis.host_memory.fix_mmap_threshold`): FSDP2's
    all-gather and reduce-scatter buffers, freed around every block's forward and backward,
    otherwise stay resident (GPT-2 small on 2 ranks: 3.63-3.70 GB per rank against 2.44 GB).
    Only here: for unsharded CPU work the fixed threshold costs time (a width-32 ResNet's
    products took 1.45-1.5x the CPU time) for little memory."""
    from analysis.host_memory import fix_mmap_threshold

    res = fix_mmap_threshold()
    ctx.log(f"--fsdp: glibc's mmap threshold fixed at {res.nbytes >> 20} MiB (freed FSDP2 "
            "buffers leave the resident set)" if res.applied
            else f"--fsdp: glibc's mmap threshold left as it is: {res.reason}")


def check_fsdp_batches(data: Data) -> None:
    """FSDP2 all-gathers the weights in every forward, so every rank must run as many: refuse
    data that gives the ranks different numbers of batches, naming each rank's count."""
    from analysis.distributed import all_gather_object, all_ranks_succeed, is_main_process

    counts = all_gather_object(sum(1 for _ in data))
    with all_ranks_succeed("checking the batches per rank"):  # said once, by rank 0
        if len(set(counts)) > 1 and is_main_process():
            listed = ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))
            raise UsageError(
                f"--fsdp: every rank must run the same number of forward passes (FSDP2 "
                f"all-gathers the weights in each), but the {sum(counts)} batches of --data split "
                f"unevenly ({listed}); choose --batch-size / --max-samples so that the batches "
                f"are a multiple of {len(counts)}")


def sharded_model(args: argparse.Namespace, ctx: Ctx, setup: Any, planned: list,
                  model: Any, *, equal_batches: bool = False) -> tuple[Any, Any]:
    """The model to analyze after ``--fsdp`` (sharded in place, or as it was) and the memory
    check (:func:`plan_fsdp`)."""
    shard, memory = plan_fsdp(args, ctx, setup, planned, model, equal_batches=equal_batches)
    return (apply_fsdp(model, ctx) if shard else model), memory


def plan_fsdp(args: argparse.Namespace, ctx: Ctx, setup: Any, planned: list, model: Any = None,
              *, equal_batches: bool = False) -> tuple[bool, Any]:
    """Whether ``--fsdp`` shards the model, and the memory check: no with the usual check
    (``off``, or ``auto`` when the one-process estimate fits or there is no process group),
    else yes after a check of the per-rank estimate (each planned analysis's memory divided by
    the ranks; the products' memory measured on one process's first batch, an upper bound).
    ``model``: as for ``setup.check_memory``. ``equal_batches``: refuse data that gives the ranks
    different numbers of batches (:func:`check_fsdp_batches`: forward passes alone, e.g. a loss
    or a slice; the Hessian operator needs no such check, a rank with fewer batches runs
    zero-weight passes)."""
    from analysis import distributed as dist

    mode = getattr(args, "fsdp", "off")
    if mode == "off" or (mode == "auto" and not ctx.distributed):
        return False, setup.check_memory(planned, model)
    if mode == "on" and not ctx.distributed:
        apply_fsdp(model, ctx)  # raises the usage error
    if mode == "auto":
        whole = setup.check_memory(planned, model, ignore=True)
        if whole.fits:
            ctx.log("--fsdp auto: the one-process estimate fits, the model is not sharded")
            return False, whole
        ctx.log(f"--fsdp auto: the one-process estimate exceeds the memory available: sharding "
                f"over {dist.get_world_size()} ranks")
    world = dist.get_world_size()
    per_rank = [dataclasses.replace(c, memory_bytes=None if c.memory_bytes is None else
                                    math.ceil(c.memory_bytes / world)) for c in planned]
    memory = setup.check_memory(per_rank, model)
    if equal_batches:
        check_fsdp_batches(setup.data)
    return True, memory
