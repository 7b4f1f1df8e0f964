"""``landscape sharpness``: a table of sharpness metrics for one or many checkpoints."""

from __future__ import annotations

import argparse
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from landscape._format import STDERR_LINE, WithError, format_table, format_value
from landscape.defaults import cli_default

from . import estimate as E
from ._common import UsageError, positive_int
from .files import checkpoint_paths, keys_note, label, per_file, raise_failures
from .fsdp import add_fsdp_option, apply_fsdp, plan_fsdp
from .options import add_command, add_common_options
from .output import Ctx, envelope
from .setup import Setup

__all__ = ["EPILOG", "FSDP_METRICS", "data_size_check", "register", "run", "settings_notes"]

#: The metrics ``--fsdp`` computes on a sharded model (Hessian products on the shards).
FSDP_METRICS = ("lambda_max", "trace")

EPILOG = """example:
  landscape sharpness runs/ --model mypkg.models:resnet18 --data mypkg.data:val_loader \\
      --metric worst --metric worst_plain --metric lambda_max --json sharpness.json"""


def register(sub: Any) -> None:
    """Add the ``sharpness`` subcommand to the subparsers ``sub``."""
    from ..report import METRIC_NAMES

    p = add_command(sub, "sharpness", "table of sharpness metrics for one or many checkpoints", EPILOG)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint files or directories")
    p.add_argument("--metric", action="append", choices=list(METRIC_NAMES), metavar="NAME",
                   help=f"repeatable; one of {', '.join(METRIC_NAMES)} "
                        f"(default: {', '.join(METRIC_NAMES[:3])})")
    p.add_argument("--rho", type=float, default=None,
                   help="perturbation radius rho of the worst/average metrics (default: each metric's "
                        "own, recorded in the JSON and shown under the table)")
    p.add_argument("--m", type=positive_int, default=None, metavar="M",
                   help="samples per batch m of the worst/average m-sharpness metrics "
                        f"(default: min({cli_default('sharpness', '--m')}, N), N the samples)")
    add_common_options(p)
    add_fsdp_option(p, "; with --fsdp the metrics lambda_max and trace (default: lambda_max)")
    p.set_defaults(func=run)


def data_size_check(args: argparse.Namespace, ctx: Ctx) -> Callable[[Any], None]:
    """``--m`` must not exceed the samples (after --max-samples; per process under torchrun)."""

    def check(source: Any) -> None:
        if args.m is None:
            return
        n = source.num_samples()
        if args.m > n:
            where = f" (this process's share of {ctx.args.data} under torchrun)" if ctx.distributed else ""
            cap = f" after --max-samples {args.max_samples}" if args.max_samples else ""
            raise UsageError(f"--m {args.m} is larger than the {n} samples of --data{cap}{where}; "
                             f"pass --m {n} or less")

    return check


def costs(metrics: Sequence[str], n: int, itemsize: int, num_samples: int, m: int | None) -> list[E.Cost]:
    """The predicted cost of each metric on one checkpoint (the library's defaults)."""
    from analysis.sharpness.m_sharpness import sharpness

    defaults = E.defaults_of(sharpness)
    m = m if m is not None else min(int(cli_default("sharpness", "--m")), num_samples)
    out = []
    for name in metrics:
        base = name.removesuffix("_plain")
        if base in ("worst", "average"):
            out.append(E.m_sharpness_cost(num_samples, kind=base, m=m,
                                          n_eval=defaults["n_eval"], steps=defaults["steps"],
                                          samples=defaults["samples"], init=defaults["init"],
                                          restarts=defaults["restarts"], label=name))
        elif base == "lambda_max":
            out.append(E.lanczos_cost(n, 1, itemsize, label="lambda_max (Lanczos, k=1)"))
        elif base == "trace":
            out.append(E.trace_cost(n, itemsize, **E.trace_defaults()))
        else:
            out.append(E.unknown_cost(name))
    return out


def run(args: argparse.Namespace, ctx: Ctx) -> int:
    """Compute the table (and ``--json``); exit 1 when some checkpoints failed."""
    from ..report import METRIC_NAMES, checkpoint_keys, checkpoint_metrics

    metrics = args.metric or (list(METRIC_NAMES[:3]) if args.fsdp == "off" else ["lambda_max"])
    if args.fsdp != "off" and set(metrics) - set(FSDP_METRICS):
        raise UsageError(f"--fsdp runs the metrics {', '.join(FSDP_METRICS)} (Hessian products on the "
                         f"shards), not {', '.join(m for m in metrics if m not in FSDP_METRICS)}: "
                         "m-sharpness ascends per batch of m samples, which ranks sharing one "
                         "sharded model cannot do; leave --fsdp out for them")
    if args.rho is not None and not (math.isfinite(args.rho) and args.rho > 0):
        raise UsageError(f"--rho {args.rho}: need a finite number > 0")
    paths = checkpoint_paths(args.checkpoints, keep_going=True)
    setup = Setup(args, ctx, check_data=data_size_check(args, ctx))
    planned = costs(metrics, setup.num_params, setup.itemsize, setup.data.num_samples(), args.m)
    E.announce(planned, ctx.log, checkpoints=len(paths))
    shard, _ = plan_fsdp(args, ctx, setup, planned, equal_batches=True)
    used: dict[str, list] = {name: [] for name in metrics}

    def work(path: pathlib.Path) -> dict:
        ctx.log(f"[{path}] computing {', '.join(metrics)}")
        model, ckpt = setup.load(path)
        if shard:
            apply_fsdp(model, ctx)
        values = checkpoint_metrics(model, setup.loss_fn, setup.data, metrics, rho=args.rho,
                                    m=args.m, seed=args.seed, progress=ctx.progress)
        _log_used(ctx, planned, metrics, values, used, str(path))
        keys = checkpoint_keys(ckpt)
        return {"checkpoint": str(path), "perturbed": ckpt.perturbed, **values,
                **({"checkpoint_keys": keys} if any(keys.values()) else {})}

    records, failures = per_file(paths, ctx, work)
    header = ["checkpoint", "loss", "accuracy", *[f"{m} +- SE" for m in metrics]]
    rows = [[label(pathlib.Path(r["checkpoint"]), paths) + (" *" if r.get("checkpoint_keys") else ""),
             r["loss"], r["accuracy"], *[_cell(r, m) for m in metrics]] for r in records]
    rows += [[label(pathlib.Path(f["checkpoint"]), paths) + " (failed)", None, None,
              *[None] * len(metrics)] for f in failures]
    text = format_table(header, rows)
    notes = settings_notes(metrics, records, m_given=args.m is not None)
    notes += [f"{m}: undefined for {label(pathlib.Path(r['checkpoint']), paths)}: "
              f"{r['settings'][m]['undefined']}" for r in records for m in metrics if _undefined(r, m)]
    notes += [STDERR_LINE] if records else []
    notes += sorted({f"{m}: SE undefined: {why}" for r in records
                     for m, why in r.get("stderr_reason", {}).items() if not _undefined(r, m)})
    notes += keys_note(records, paths)
    notes += [f"failed: {label(pathlib.Path(f['checkpoint']), paths)}: {f['error']}" for f in failures]
    if notes:
        text += "\n" + "\n".join(notes)
    ctx.out(text)
    settings = records[0].get("settings", {}) if records else {}
    ctx.write_json(envelope("sharpness", metrics=metrics, rho=args.rho, m=args.m,
                            settings={k: settings.get(k, {}) for k in metrics}, checkpoints=records,
                            errors=failures,
                            estimate=[{**c.to_dict(), "used": used[name]} for c, name in zip(planned, metrics)]))
    raise_failures(failures, paths, " and written to --json" if args.json else "")
    return 0


def _undefined(record: dict, metric: str) -> bool:
    return bool(record.get("settings", {}).get(metric, {}).get("undefined"))


def _cell(record: dict, metric: str) -> Any:
    """A metric's table cell: ``value +- SE``, or ``"undefined"`` (the reason is a note)."""
    if _undefined(record, metric):
        return "undefined"
    return WithError(record["metrics"][metric], record.get("stderr", {}).get(metric))


def _log_used(ctx: Ctx, planned: Sequence[E.Cost], metrics: Sequence[str], values: dict,
              used: dict[str, list], checkpoint: str) -> None:
    """Print and keep, per metric, what one checkpoint's run used beside the estimate: the
    products its result counted (``num_matvecs``), its forward passes where the result records
    them, and its seconds."""
    for cost, name in zip(planned, metrics):
        st = values.get("settings", {}).get(name, {})
        rec = {"checkpoint": checkpoint, "hvps": st.get("num_matvecs"),
               "forward_passes": st.get("forward_passes"), "num_batches": st.get("num_batches"),
               "seconds": values.get("seconds", {}).get(name)}
        used[name].append(rec)
        if rec["seconds"] is not None:
            ctx.log(E.describe_used(cost, rec["hvps"], rec["seconds"], rec["forward_passes"]))


def settings_notes(metrics: Sequence[str], records: Sequence[dict], *, m_given: bool = True) -> list[str]:
    """One footnote per worst/average metric: the rho, m and steps/samples it used (and, when
    the default m was capped at a small data set's size, that it was)."""
    default_m = cli_default("sharpness", "--m")
    notes = []
    for name in metrics:
        if name.removesuffix("_plain") not in ("worst", "average"):
            continue
        seen = {(st.get("rho"), st.get("m"), st.get("steps"), st.get("samples"), st.get("adaptive"))
                for st in (r.get("settings", {}).get(name, {}) for r in records)}
        for rho, m, steps, samples, adaptive in sorted(seen, key=str):
            capped = not m_given and isinstance(m, int) and m < default_m
            parts = [f"rho={format_value(rho)}",
                     f"m={m}" + (f" (the default {default_m} capped at the {m} samples; set --m "
                                 "to choose)" if capped else "")]
            parts.append(f"{steps} ascent steps" if steps is not None else f"{samples} samples")
            parts.append("adaptive (c=|w|)" if adaptive else "plain (c=1)")
            notes.append(f"{name}: " + ", ".join(parts))
    return notes

