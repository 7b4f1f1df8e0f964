"""``landscape ... --fsdp`` as torchrun runs it: functions run on every rank by
tests/distributed/test_fsdp_cli.py (through ``launcher.run_ranks(..., torchrun_env=True)``)."""

from __future__ import annotations

import contextlib
import io

NET = ["--model", "tests.distributed.fsdp_cli_net:build",
       "--data", "tests.distributed.fsdp_cli_net:data"]


def cli_runs(rank: int, world: int, runs: list[list[str]]) -> list[dict]:
    """``landscape.cli.main(argv)`` for each ``argv`` of ``runs`` in turn (each joins and leaves
    the process group, as one torchrun invocation); the exit code, stdout and stderr of each."""
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
