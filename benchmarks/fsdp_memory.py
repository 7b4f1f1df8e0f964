"""Per-rank peak memory of the top Hessian eigenvalue of GPT-2 small: one process against 2 ranks
with FSDP2 (issue 24 item 6; goal: per-rank peak <= 0.6x the one-process peak).

Both runs are subprocesses started by this script, one after the other (a fresh resident-set
high-water mark each, ``VmHWM`` of ``/proc/self/status``, over the whole run: torch, the model's
construction and the data included):

* **1 process**: ``top_eigenpairs(model, "lm", data, k=1, tol=1e-2, method="finite-difference",
  max_basis=4, max_iter=--max-iter, data_stderr=False)`` on the unsharded model;
* **2 ranks** (``torch.distributed.run --nproc_per_node 2``, gloo on the CPU): every rank builds
  the same model, shards it as ``landscape ... --fsdp`` does (``fully_shard`` on each
  transformer block, then the root, :func:`landscape.cli.fsdp.shard_policy`) and runs the same
  call on its half of the data (``as_data(..., shard=True)``); the products are finite
  differences of FSDP2's gradients on the shards (:class:`analysis.operators.ShardedHessianOperator`).

Both runs first fix glibc's mmap threshold at 1 MiB, as ``landscape ... --fsdp`` does
(:func:`analysis.host_memory.fix_mmap_threshold`; ``--malloc default`` keeps glibc's dynamic
threshold, under which the ranks keep freed FSDP2 buffers resident).

Model: ``transformers.GPT2Config()`` (124.4M parameters, random weights, seed 0, no dropout,
eval mode; no download), data: 4 x 128 random tokens as two batches of 2 x 128 (one per rank).
``--quick``: a 2-layer, width-64 GPT-2 (seconds, for trying the script out).

Prints one line per run (peak RSS per rank, seconds, eigenvalue, products) and the ratio
``max_r peak_r / peak_1``; ``--json PATH`` appends the rows as JSON lines. GPT-2 small takes
several minutes and ~10 GB over the two runs: run it under the shared lock::

    flock /work/bench.lock env PYTHONPATH=. python benchmarks/fsdp_memory.py --max-iter 3
    PYTHONPATH=. python benchmarks/fsdp_memory.py --quick

Measured numbers: ``docs/benchmarks.md`` and ``docs/guides/distributed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # benchmarks/landscape.py would shadow the landscape package

QUICK = dict(n_embd=64, n_layer=2, n_head=2)
BATCHES, BATCH, SEQ = 2, 2, 128
GOAL = 0.6


def worker(quick: bool, max_iter: int, max_basis: int, malloc: str = "fixed") -> dict:
    """One run in this process (a rank of torchrun, or the one process); ``malloc="fixed"``
    fixes glibc's mmap threshold first, as ``landscape ... --fsdp`` does
    (:func:`analysis.host_memory.fix_mmap_threshold`), ``"default"`` leaves glibc's dynamic one."""
    from analysis.host_memory import fix_mmap_threshold, peak_resident_bytes, resident_bytes

    if malloc == "fixed":
        fix_mmap_threshold()
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from analysis import distributed as dist
    from analysis import top_eigenpairs
    from analysis.data import as_data

    torch.set_num_threads(1 if dist.launched_by_torchrun() else 2)
    imported = resident_bytes()  # torch, transformers and the toolkit, before the model
    dist.init_from_env()
    world = dist.get_world_size()
    torch.manual_seed(0)
    cfg = GPT2Config(**(QUICK if quick else {}), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    data = []
    for _ in range(BATCHES):
        ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from landscape.cli.fsdp import shard_policy

        mesh = init_device_mesh("cpu", (world,))
        for m in shard_policy(model):
            fully_shard(m, mesh=mesh, reshard_after_forward=True)
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                for p in model.parameters())
    t0 = time.perf_counter()
    res = top_eigenpairs(model, "lm", as_data(data, shard=world > 1), k=1, tol=1e-2,
                         method="finite-difference", max_basis=max_basis, max_iter=max_iter,
                         data_stderr=False)
    seconds = time.perf_counter() - t0
    out = {"world": world, "rank": dist.get_rank(), "model": "quick" if quick else "gpt2-small",
           "malloc": malloc,
           "n": n, "local_n": local, "tokens": f"{BATCHES * BATCH}x{SEQ}", "seconds": seconds,
           "eigenvalue": float(res.eigenvalues[0]), "products": int(res.num_matvecs),
           "converged": bool(res.converged), "peak_rss_gb": peak_resident_bytes() / 1e9,
           "imports_rss_gb": imported / 1e9}
    dist.barrier()
    del model, res  # freed before the group goes (see landscape.cli.entry: the abort at exit)
    import gc

    gc.collect()
    dist.shutdown()
    return out


def _run(cmd: list[str]) -> list[dict]:
    """The rows a worker command writes (one JSON file per rank under ``--out``)."""
    import pathlib
    import tempfile

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([*cmd, f"--out={tmp}"], capture_output=True, text=True, env=env)
        rows = [json.loads(f.read_text()) for f in sorted(pathlib.Path(tmp).glob("*.json"))]
    if proc.returncode != 0:
        if rows and len(rows) == rows[0]["world"]:  # every rank reported, then teardown failed
            print(f"note: exit code {proc.returncode} after every rank reported (process-group "
                  "teardown)", file=sys.stderr)
        else:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 2-layer width-64 GPT-2 (seconds)")
    ap.add_argument("--max-iter", type=int, default=3, help="Lanczos products at most")
    ap.add_argument("--max-basis", type=int, default=4)
    ap.add_argument("--malloc", choices=("fixed", "default"), default="fixed",
                    help="glibc's mmap threshold in both runs: fixed at 1 MiB as --fsdp does "
                         "(default), or glibc's dynamic default")
    ap.add_argument("--json", default=None, help="append the rows as JSON lines to this file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    flags = [f"--max-iter={args.max_iter}", f"--max-basis={args.max_basis}",
             f"--malloc={args.malloc}"] + \
        (["--quick"] if args.quick else [])
    if args.worker:
        row = worker(args.quick, args.max_iter, args.max_basis, args.malloc)
        with open(os.path.join(args.out, f"rank{row['rank']}.json"), "w") as fh:
            json.dump(row, fh)
        return
    me = os.path.abspath(__file__)
    one = _run([sys.executable, me, "--worker", *flags])
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", me, "--worker", *flags])
    rows = one + sorted(two, key=lambda r: r["rank"])
    for r in rows:
        print(f"{r['model']} {r['tokens']} tokens, {r['world']} process(es), rank {r['rank']}, "
              f"malloc {r['malloc']}: "
              f"peak RSS {r['peak_rss_gb']:.2f} GB ({r['imports_rss_gb']:.2f} GB after the "
              f"imports), {r['local_n']} of {r['n']} parameters, "
              f"{r['seconds']:.1f} s, {r['products']} products, lambda_max {r['eigenvalue']:.6g}")
    ratio = max(r["peak_rss_gb"] for r in two) / one[0]["peak_rss_gb"]
    print(f"per-rank peak at 2 ranks / one-process peak: {ratio:.2f} "
          f"(goal <= {GOAL}: {'met' if ratio <= GOAL else 'missed'})")
    above = max(r["peak_rss_gb"] - r["imports_rss_gb"] for r in two) / \
        (one[0]["peak_rss_gb"] - one[0]["imports_rss_gb"])
    print(f"the same above the RSS after the imports: {above:.2f}")
    if args.json:
        with open(args.json, "a") as fh:
            for r in rows:
                fh.write(json.dumps({**r, "ratio": ratio, "ratio_above_imports": above}) + "\n")


if __name__ == "__main__":
    main()
