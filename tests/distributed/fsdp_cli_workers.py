"""``landscape ... --fsdp`` as torchrun runs it: functions run on every rank by
tests/distributed/test_fsdp_cli.py (through ``launcher.run_ranks(..., torchrun_env=True)``)."""

from __future__ import annotations

import contextlib
import io

NET = ["--model", "tests.distributed.fsdp_cli_net:build",
       "--data", "tests.distributed.fsdp_cli_net:data"]


def cli_runs(rank: int, world: int, runs: list[list[str]]) -> list[dict]:
    """``landscape.cli.main(argv)`` for each ``argv`` of ``runs`` in turn (each joins and leaves
    the process group, as one torchrun invocation); the exit code, stdout and stderr of each.
    Pass one run per spawn: a second process group in the same processes can hang in
    ``init_process_group``."""
    import torch.distributed as dist

    from landscape.cli import main

    out = []
    for argv in runs:
        o, e = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            code = main(argv)
        out.append({"code": code, "stdout": o.getvalue(), "stderr": e.getvalue(),
                    "initialized_after": dist.is_initialized()})
    return out


ALPHAS = (-1.0, -0.25, 0.5, 1.0)


def slice_checks(rank: int, world: int) -> dict:
    """Random directions (three normalizations, one orthogonal to another) and 1-D / 2-D slices
    of ``fsdp_workers.make_model`` (sharded on ``world > 1`` ranks, every tensor unevenly); the
    directions as full vectors (gathered) and the slices' losses."""
    import numpy as np

    from analysis import ParameterSpace, random_direction
    from analysis.data import as_data
    from landscape import slice_1d, slice_2d
    from tests.distributed.fsdp_workers import make_model, shard
    from tests.models import classification_data

    x, y = classification_data(n=16, d=6, classes=3, seed=4)
    model = make_model()
    if world > 1:
        shard(model)
    space = ParameterSpace(model)
    full = (lambda d: d) if space.shards is None else space.shards.full
    data = as_data((x, y), batch_size=4, shard=world > 1)
    out: dict = {"local_numel": space.numel, "full_numel": space.full_numel}
    for norm in ("filter", "layer", "model"):
        d = random_direction(model, seed=3, normalization=norm)
        out[norm] = full(d)
        out[f"{norm}-slice"] = slice_1d(model, "cross_entropy", data, d, ALPHAS,
                                        progress=False).loss
    d1 = random_direction(model, seed=0)
    d2 = random_direction(model, seed=1, orthogonal_to=d1)
    out["d1"], out["d2"] = full(d1), full(d2)
    s2 = slice_2d(model, "cross_entropy", data, d1, d2, ALPHAS[:2], ALPHAS[2:], progress=False)
    out["plane"] = np.asarray(s2.loss)
    out["after"] = [t.clone() for t in space.params]  # restored exactly: the local shards
    return out
