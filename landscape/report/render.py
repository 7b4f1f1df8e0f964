"""The self-contained HTML page of the report (rendering only; the numbers come from
:mod:`landscape.report.compute`).

:func:`write_report` renders entries into ONE offline HTML page: a metrics table, the 1-D slices
of all checkpoints overlaid (one figure per direction kind), one 2-D contour per checkpoint and
the spectral densities overlaid, plus optional extra figures (the demo adds training curves).
plotly's JavaScript is embedded exactly once (in the first figure), so the page needs no
network; figures are 2-D SVG plots (contours, not WebGL surfaces), which render in any browser,
headless ones included.
"""

from __future__ import annotations

import datetime as _dt
import html
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._format import WithError, format_value
from .compute import ReportEntry, describe_checkpoint_keys


def density_figure(densities: Mapping[str, Any], *, title: str = "Hessian spectral density (SLQ)"):
    """A plotly figure overlaying spectral densities ``{label: {"grid", "density"}}`` (log y)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for label, d in densities.items():
        if d is None:
            continue
        grid = np.asarray(d["grid"] if isinstance(d, Mapping) else d.grid, dtype=np.float64)
        dens = np.asarray(d["density"] if isinstance(d, Mapping) else d.density, dtype=np.float64)
        floor = max(float(np.nanmax(dens)) if dens.size else 1.0, 1e-300) * 1e-10
        fig.add_trace(go.Scatter(x=grid, y=np.maximum(dens, floor), mode="lines", name=str(label)))
    fig.update_layout(title=title, xaxis_title="eigenvalue", yaxis_title="density",
                      template="plotly_white")
    fig.update_yaxes(type="log")
    return fig


def _fmt(v: Any) -> str:
    return "&ndash;" if v is None else html.escape(format_value(v, pm=" \u00b1 "))


def _with_error(value: Any, se: Any) -> Any:
    """``value +- se`` for a metric with a data-sampling standard error, else the value."""
    return value if se is None or value is None else WithError(value, se)


#: The note under the table when some metric carries a standard error.
STDERR_NOTE = ("\u00b1: the data-sampling standard error (how far the number would move on "
               "another draw of as many samples; value \u00b1 2 SE covers the full-population "
               "value about 95% of the time, see analysis.uncertainty)")


_LABELS = {
    "loss": "loss",
    "accuracy": "accuracy",
    "test_accuracy": "test accuracy",
    "train_loss": "train loss",
    "lambda_max": "&lambda;<sub>max</sub>",
    "sharpness": "adaptive worst-case sharpness",
    "trace": "trace(H)",
    "seconds_per_epoch": "s / epoch",
}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
table.metrics{border-collapse:collapse;margin:1em 0}
table.metrics th,table.metrics td{border:1px solid #ccc;padding:.3em .7em;text-align:right}
table.metrics th:first-child,table.metrics td:first-child{text-align:left}
table.metrics thead th{background:#f3f3f3}
.note{color:#555;font-size:.92em}.grid2{display:flex;flex-wrap:wrap;gap:1em}
.grid2>div{flex:1 1 480px;min-width:420px}
"""


def _table(entries: Sequence[ReportEntry], columns: Sequence[str] | None) -> str:
    if columns is None:
        seen: list[str] = []
        for e in entries:
            for k in list(e.info) + list(e.metrics):
                if k not in seen:
                    seen.append(k)
        columns = seen
    head = "".join(f"<th>{_LABELS.get(c, html.escape(c))}</th>" for c in columns)
    rows = []
    for e in entries:
        vals = {**e.info, **e.metrics}
        cells = "".join("<td>undefined</td>" if (e.settings.get(c) or {}).get("undefined")
                        else f"<td>{_fmt(_with_error(vals.get(c), e.stderr.get(c)))}</td>"
                        for c in columns)
        rows.append(f"<tr><td>{html.escape(e.name)}</td>{cells}</tr>")
    return (f"<table class='metrics' id='metrics'><thead><tr><th>checkpoint</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _settings_notes(entries: Sequence[ReportEntry]) -> list[str]:
    """``"<metric label>: rho=0.1, m=128, 20 ascent steps"`` per distinct metric setting."""
    out: list[str] = []
    for e in entries:
        for metric, st in e.settings.items():
            if st.get("undefined"):
                out.append(f"{metric}: undefined for {e.name}: {st['undefined']}")
                continue
            parts = [f"{k}={_plain(st[k])}" for k in ("rho", "m") if st.get(k) is not None]
            if st.get("steps") is not None:
                parts.append(f"{st['steps']} ascent steps")
            if st.get("adaptive") is not None:
                parts.append("adaptive, c = |w|" if st["adaptive"] else "c = 1")
            label = re.sub(r"<[^>]+>", "", _LABELS.get(metric, metric)).replace("&lambda;", "lambda")
            line = f"{label}: " + ", ".join(parts)
            if parts and line not in out:
                out.append(line)
    return out


def _plain(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _figures(entries: Sequence[ReportEntry], extra_figures: Sequence[tuple[str, Any]]) -> list[tuple[str, str, Any]]:
    """The report's plotly figures in page order, as ``(section, caption, figure)``: the extra
    figures, the 1-D slices overlaid per direction kind, one 2-D contour per entry, the spectral
    densities overlaid."""
    figures: list[tuple[str, str, Any]] = []
    for caption, fig in extra_figures:
        figures.append(("Training", caption, fig))
    kinds: list[str] = []
    for e in entries:
        for s in e.slices_1d:
            if s.label not in kinds:
                kinds.append(s.label)
    from ..plots import plotly_1d, plotly_contour

    for kind in kinds:
        items = [(e.name, s) for e in entries for s in e.slices_1d if s.label == kind]
        what = "a filter-normalized random direction" if kind == "random" else (
            "the filter-normalized gradient" if kind == "gradient" else kind)
        fig = plotly_1d([s for _, s in items], labels=[n for n, _ in items],
                        title=f"1-D loss slice along {what}")
        figures.append(("1-D slices", f"L(w + alpha d), d = {what}, per checkpoint", fig))
    for e in entries:
        if e.slice_2d is not None:
            fig = plotly_contour(e.slice_2d, title=f"{e.name}: loss on a random 2-D plane")
            figures.append(("2-D slices", f"{e.name}: L(w + x d1 + y d2), filter-normalized d1, d2", fig))
    dens = {e.name: e.density for e in entries if e.density is not None}
    if dens:
        figures.append(("Hessian spectral density", "stochastic Lanczos quadrature, Gaussian-smoothed",
                        density_figure(dens)))
    return figures


def report_html(
    entries: Sequence[ReportEntry],
    *,
    title: str = "Loss landscape report",
    intro: str | None = None,
    columns: Sequence[str] | None = None,
    extra_figures: Sequence[tuple[str, Any]] = (),
    notes: Sequence[str] = (),
) -> str:
    """The report as one HTML string (see :func:`write_report`)."""
    import plotly.io as pio

    _check_entries(entries)
    figures = _figures(entries, extra_figures)
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    parts.append("<h2>Metrics</h2>")
    parts.append(_table(entries, columns))
    key_notes = []
    for e in entries:
        text = describe_checkpoint_keys(e.checkpoint_keys) if e.checkpoint_keys else None
        if text:
            key_notes.append(f"{e.name}: loaded non-strictly: {text}")
    se_note = [STDERR_NOTE] if any(e.stderr for e in entries) else []
    for n in [*_settings_notes(entries), *se_note, *key_notes, *notes]:
        parts.append(f"<p class='note'>{html.escape(n)}</p>")
    section = None
    config = {"displaylogo": False, "responsive": True}
    for i, (sec, caption, fig) in enumerate(figures):
        if sec != section:
            if section == "2-D slices":
                parts.append("</div>")
            parts.append(f"<h2>{html.escape(sec)}</h2>")
            if sec == "2-D slices":
                parts.append("<div class='grid2'>")
            section = sec
        fig.update_layout(height=420 if sec != "2-D slices" else 460, margin={"t": 60, "b": 50})
        div = pio.to_html(fig, full_html=False, include_plotlyjs=(i == 0), div_id=f"figure-{i}",
                          config=config, validate=False)
        parts.append(f"<figure><div>{div}</div><figcaption class='note'>{html.escape(caption)}</figcaption></figure>")
    if section == "2-D slices":
        parts.append("</div>")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f"<p class='note'>Generated by the landscape toolkit on {stamp}. "
                 "Self-contained: opens offline.</p></body></html>")
    return "\n".join(parts)


def _check_entries(entries: Any) -> None:
    if isinstance(entries, ReportEntry):
        raise TypeError("entries must be a list of ReportEntry, got one ReportEntry (wrap it in a list)")
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise TypeError(f"entries must be a list of ReportEntry, got {entries!r}")
    if not entries:
        raise ValueError("the report needs at least one entry")
    for i, e in enumerate(entries):
        if not isinstance(e, ReportEntry):
            raise TypeError(f"entries[{i}] must be a ReportEntry (from analyze_checkpoint), got {e!r}")


def write_report(
    entries: Sequence[ReportEntry],
    path: str | os.PathLike,
    **kwargs: Any,
) -> pathlib.Path:
    """Write the self-contained HTML report of ``entries`` to ``path`` (parents created).

    Keyword arguments are those of :func:`report_html` (``title``, ``intro``, ``columns``,
    ``extra_figures`` as ``[(caption, plotly_figure)]``, ``notes``). The file is written to a
    temporary file in the same folder and renamed (:func:`landscape._atomic.atomic_write`), so a
    reader never sees half a page and a failed write leaves an old report as it was.

    Raises:
        TypeError: ``entries`` is not a list of :class:`ReportEntry`, or ``path`` not a path.
    """
    from .._atomic import atomic_write

    _check_entries(entries)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {path!r}")
    text = report_html(entries, **kwargs)
    p = pathlib.Path(path)
    with atomic_write(p) as f:
        f.write(text)
    return p
