"""Sharded analysis of an FSDP2 model (issue 24 item 2): per-rank basis memory and time.

One configuration per run of spawned gloo processes (CPU, one thread each): the same float32
MLP (``--width``, ``--depth``), unsharded on 1 process (``HessianOperator(...,
method="finite-difference")``) and sharded with ``fully_shard`` on 2 ranks (the
``ShardedHessianOperator`` it builds), on the same data (every rank the whole data). Each
process runs ``top_eigenpairs(k=3, tol=1e-3)`` with ``max_basis=20`` and reports

* ``basis_bytes``: the Krylov basis it allocated (per rank), and ``memory_bound_bytes``;
* ``seconds`` and ``matvecs``, and ``s_per_matvec``;
* ``draw_s``: one random start vector drawn (``torch.randn(n)`` on one process, this rank's
  slice of it, drawn in chunks, on a sharded rank).

Prints the ratios of the 2-rank numbers to the 1-process baseline of the same run (the 2 ranks
share the machine's cores, so time ratios on a loaded 2-core machine are indicative only).

Usage::

    PYTHONPATH=. python benchmarks/sharded_analysis.py               # 1.1M parameters
    PYTHONPATH=. python benchmarks/sharded_analysis.py --width 256 --depth 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.multiprocessing as mp


def _model(width: int, depth: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(64, width), torch.nn.Tanh()]
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    layers.append(torch.nn.Linear(width, 10))
    return torch.nn.Sequential(*layers)


def _worker(rank: int, world: int, width: int, depth: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(minutes=10))
    from analysis import HessianOperator, top_eigenpairs

    model = _model(width, depth)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g)
    op = HessianOperator(model, "cross_entropy", (x, y), batch_size=128,
                         method="finite-difference")
    shards = getattr(op, "shards", None)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    _ = torch.randn(op.shape[0], generator=gen) if shards is None else shards.randn(gen)
    draw = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = top_eigenpairs(op, k=3, tol=1e-3, max_basis=20, data_stderr=False)
    secs = time.perf_counter() - t0
    row = {"world": world, "rank": rank, "n": op.shape[0],
           "local": op.shape[0] if shards is None else shards.local_numel,
           "basis_bytes": res.basis_bytes, "memory_bound_bytes": res.memory_bound_bytes,
           "seconds": secs, "matvecs": res.num_matvecs, "s_per_matvec": secs / res.num_matvecs,
           "draw_s": draw, "top": res.eigenvalues.tolist()}
    with open(os.path.join(out, f"{world}-{rank}.json"), "w") as f:
        json.dump(row, f)
    dist.destroy_process_group()


def _run(world: int, width: int, depth: int, out: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, width, depth, os.path.join(tmp, "init"), out),
                 nprocs=world, join=True)
    rows = []
    for r in range(world):
        with open(os.path.join(out, f"{world}-{r}.json")) as f:
            rows.append(json.load(f))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=720)
    ap.add_argument("--depth", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        one = _run(1, args.width, args.depth, out)[0]
        two = _run(2, args.width, args.depth, out)
    print(f"n = {one['n']}, top-3 (1 process) {one['top']}, (2 ranks) {two[0]['top']}")
    print("| | local n | basis MB | bound MB | matvecs | s / matvec | draw s |")
    print("|---|---|---|---|---|---|---|")
    for row in [one, *two]:
        name = "1 process" if row["world"] == 1 else f"2 ranks, rank {row['rank']}"
        print(f"| {name} | {row['local']} | {row['basis_bytes'] / 2**20:.2f} | "
              f"{row['memory_bound_bytes'] / 2**20:.2f} | {row['matvecs']} | "
              f"{row['s_per_matvec']:.4f} | {row['draw_s']:.4f} |")
    for row in two:
        print(f"rank {row['rank']} / 1 process: basis {row['basis_bytes'] / one['basis_bytes']:.3f}, "
              f"s per matvec {row['s_per_matvec'] / one['s_per_matvec']:.2f}, "
              f"draw {row['draw_s'] / max(one['draw_s'], 1e-9):.2f}")


if __name__ == "__main__":
    sys.exit(main())
