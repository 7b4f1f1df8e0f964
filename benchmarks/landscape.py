"""Benchmark: 2-D loss-landscape slice, per-point cost against a bare forward pass and loss-landscapes.

Setup: the demo CNN (``landscape.models.digits_cnn``, ~151k parameters, BatchNorm in eval mode),
512 digits images, a 21 x 21 grid on the plane of two filter-normalized random directions.

Measured in one process; with ``--repeats`` > 1 the grids are repeated and the best is kept:

* ``bare forward``: ``F.cross_entropy(model(x), y)`` under ``no_grad`` on the 512 cached
  samples, the floor for one grid point: median of 10 calls before and 10 after each grid;
* ``slice_2d``: our whole call (data caching, origin, 441 points, restore) divided by 441;
  target: <= 1.05 x the bare forward pass;
* ``loss-landscapes``: ``planar_interpolation`` of the same plane (its per-point loop of in-place
  adds and a ``Loss`` metric), when the package imports; its values are compared with ours at
  the coordinates it actually evaluates (its even rows are shifted by one step along ``d2``).
  Its ``random_plane(normalization="filter")`` is also run once to record what it does on a
  model with zero BatchNorm biases.

A second table interleaves point by point (one bare forward, one point of ours, one point of
loss-landscapes per round) and reports median CPU-time ratios, which a busy machine disturbs
much less than whole-grid wall times.

Run: ``python benchmarks/landscape.py`` (by default only 5 rows of the peer grid are timed and
extrapolated to the 21 rows, to keep the run short; ``--peer-rows 0`` times the whole grid).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import ParameterSpace, random_direction  # noqa: E402
from landscape import slice_2d  # noqa: E402
from landscape.datasets import load_digits  # noqa: E402
from landscape.models import digits_cnn  # noqa: E402


def _clock() -> np.ndarray:
    """(wall seconds, CPU seconds of this process): CPU time is less disturbed by other load."""
    return np.array([time.perf_counter(), time.process_time()])


def bare_forward_time(model, x, y, repeats: int) -> np.ndarray:
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(3):
            F.cross_entropy(model(x), y)
        for _ in range(repeats):
            t = _clock()
            F.cross_entropy(model(x), y).item()
            times.append(_clock() - t)
    return np.median(np.stack(times), axis=0)


def ours(model, x, y, d1, d2, coords):
    t = _clock()
    s = slice_2d(model, "cross_entropy", (x, y), d1, d2, coords, coords, metrics=("loss",),
                 progress=False)
    return _clock() - t, s


def peer_grid(model, x, y, d1, d2, steps: int, rows: int | None):
    """loss-landscapes planar_interpolation over start + [0, 1) x [0, 1] of (steps*d1, steps*d2)."""
    from loss_landscapes import main as ll_main
    from loss_landscapes.metrics import Loss

    start = copy.deepcopy(model).eval()
    end1, end2 = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
    ParameterSpace(end1).add_(d1)
    ParameterSpace(end2).add_(d2)
    metric = Loss(F.cross_entropy, x, y)
    if not rows or rows >= steps:
        t = _clock()
        with torch.no_grad():
            grid = ll_main.planar_interpolation(start, end1, end2, metric, steps=steps)
        return _clock() - t, grid, steps
    # time `rows` rows through the same code path: a plane whose first direction stops early
    end1r = copy.deepcopy(model).eval()
    ParameterSpace(end1r).add_(d1 * (rows / steps))
    t = _clock()
    with torch.no_grad():
        # planar_interpolation takes `steps` rows; emulate `rows` rows by calling its inner loop
        # on a `rows x steps` plane: same per-point work
        grid = _planar_rows(ll_main, start, end1r, end2, metric, steps, rows)
    return (_clock() - t) * steps / rows, grid, rows


def _planar_rows(ll_main, start, end1, end2, metric, steps, rows):
    """The loop of loss_landscapes.main.planar_interpolation, for the first `rows` rows."""
    w = ll_main.wrap_model(start)
    p0 = w.get_module_parameters()
    dir_one = (ll_main.wrap_model(end1).get_module_parameters() - p0) / rows
    dir_two = (ll_main.wrap_model(end2).get_module_parameters() - p0) / steps
    out = []
    for i in range(rows):
        col = []
        for _ in range(steps):
            if i % 2 == 0:
                p0.add_(dir_two)
                col.append(metric(w))
            else:
                p0.sub_(dir_two)
                col.insert(0, metric(w))
        out.append(col)
        p0.add_(dir_one)
    return np.array(out)


def paired_points(model, x, y, d1, d2, n: int, with_peer: bool) -> dict[str, np.ndarray]:
    """Point-by-point interleaving (robust to a busy machine): per round (order rotated), one
    bare forward, one
    grid point of ours (the in-place move + the cached evaluation slice_2d runs per point, from
    its internals) and, if available, one grid point of loss-landscapes (its in-place
    ``ModelParameters.add_`` + ``Loss`` metric). Returns CPU seconds per round for each."""
    from analysis.data import as_data
    from landscape.slices._points import Evaluator, Mover

    space = ParameterSpace(model)
    w = space.vector()
    mover = Mover(space, w, [d1, d2])
    evaluator = Evaluator(model, F.cross_entropy, as_data((x, y)), want_accuracy=False,
                          cache="auto", bn_source=None)
    stats = torch.zeros(n, 3, dtype=torch.float64)
    peer = None
    if with_peer:
        from loss_landscapes.main import wrap_model
        from loss_landscapes.metrics import Loss

        peer_model = copy.deepcopy(model).eval()
        wrapper = wrap_model(peer_model)
        p0 = wrapper.get_module_parameters()
        step = copy.deepcopy(p0)
        for t, dv in zip(step.parameters, space.unflatten(d2 * 0.05)):
            t.copy_(dv)
        metric = Loss(F.cross_entropy, x, y)
        peer = (p0, step, metric, wrapper)
    out: dict[str, list[float]] = {"bare": [], "ours": [], "peer": []}
    model.eval()
    with torch.no_grad():
        def run_bare(k):
            F.cross_entropy(model(x), y).item()

        def run_ours(k):
            mover.set((0.05 * k, -0.05 * k))
            evaluator.point(stats[k])

        def run_peer(k):
            p0, step, metric, wrapper = peer
            p0.add_(step)
            metric(wrapper)

        runners = [("bare", run_bare), ("ours", run_ours)]
        if peer is not None:
            runners.append(("peer", run_peer))
        for k in range(n):
            shift = k % len(runners)  # rotate the order: no method always runs first
            for name, fn in runners[shift:] + runners[:shift]:
                c = time.process_time()
                fn(k)
                out[name].append(time.process_time() - c)
        space.copy_(w)
    return {k: np.array(v) for k, v in out.items() if v}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--paired", type=int, default=40,
                        help="rounds of the point-by-point interleaved measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--peer-rows", type=int, default=5,
                        help="time only this many rows of the peer grid and extrapolate "
                             "(0: the whole grid)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    digits = load_digits(seed=0)
    x = digits.x_train[: args.samples].float()
    y = digits.y_train[: args.samples]
    model = digits_cnn().eval()
    n_params = ParameterSpace(model).numel
    d1 = random_direction(model, seed=0)
    d2 = random_direction(model, seed=1, orthogonal_to=d1)
    coords = np.linspace(-1, 1, args.steps)
    points = args.steps**2

    bare, mine, peer = [], [], []
    result = None
    peer_error = None
    peer_grid_vals = None
    peer_rows = None
    try:
        import loss_landscapes  # noqa: F401
    except Exception as err:  # pragma: no cover - depends on the environment
        peer_error = f"skipped: cannot import loss_landscapes ({type(err).__name__}: {err})"

    for _ in range(args.repeats):
        bare.append(bare_forward_time(model, x, y, repeats=10))
        t, result = ours(model, x, y, d1, d2, coords)
        mine.append(t / points)
        bare.append(bare_forward_time(model, x, y, repeats=10))
        if peer_error is None:
            try:
                t, peer_grid_vals, peer_rows = peer_grid(model, x, y, d1, d2, args.steps, args.peer_rows)
                peer.append(t / points)
            except Exception as err:  # pragma: no cover
                peer_error = f"failed: {type(err).__name__}: {err}"

    t_bare, t_ours = np.median(np.stack(bare), axis=0), np.min(np.stack(mine), axis=0)
    rows = [
        (f"bare forward ({args.samples} samples)", t_bare, np.ones(2), "-"),
        ("ours: slice_2d", t_ours, t_ours / t_bare, "reference"),
    ]
    notes = []
    if peer:
        t_peer = np.min(np.stack(peer), axis=0)
        # correctness: the peer evaluates start + i/steps*D1 + (j + [i even])/steps*D2 with
        # D1 = d1, D2 = d2 (accumulated by repeated in-place adds)
        ref_model = copy.deepcopy(model)
        pr = peer_rows
        xs_p = np.arange(pr) / args.steps
        ours_even = slice_2d(ref_model, "cross_entropy", (x, y), d1, d2, xs_p,
                             (np.arange(args.steps) + 1) / args.steps, metrics=("loss",), progress=False)
        ours_odd = slice_2d(ref_model, "cross_entropy", (x, y), d1, d2, xs_p,
                            np.arange(args.steps) / args.steps, metrics=("loss",), progress=False)
        expect = np.where((np.arange(pr) % 2 == 0)[:, None], ours_even.loss, ours_odd.loss)
        err = float(np.max(np.abs(peer_grid_vals - expect) / np.abs(expect)))
        rows.append((
            "loss-landscapes planar_interpolation"
            + (f" ({pr} rows, extrapolated)" if pr < args.steps else ""),
            t_peer, t_peer / t_bare, f"max rel. diff {err:.1e}",
        ))
        r = t_ours / t_peer
        notes.append(f"ours / loss-landscapes time per point: {r[0]:.3f} (wall), {r[1]:.3f} (CPU)")
        # its filter-normalized random plane on a model with zero BatchNorm biases
        try:
            from loss_landscapes import main as ll_main
            from loss_landscapes.metrics import Loss

            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                g = ll_main.random_plane(copy.deepcopy(model), Loss(F.cross_entropy, x, y),
                                         distance=1, steps=3, normalization="filter")
            bad = int(np.sum(~np.isfinite(g)))
            notes.append(
                f"loss-landscapes random_plane(normalization='filter') on this model: "
                f"{bad} of {g.size} values non-finite (its directions are uniform on [0, 1], "
                "not zero-mean, and BatchNorm biases at zero are divided by a zero norm)"
            )
        except Exception as err:
            notes.append(f"loss-landscapes random_plane(normalization='filter') raised "
                         f"{type(err).__name__}: {err}")
    else:
        rows.append(("loss-landscapes", np.full(2, np.nan), np.full(2, np.nan), peer_error or "not run"))

    print(f"## 2-D landscape slice: {args.steps}x{args.steps} grid, digits CNN ({n_params} params), "
          f"{args.samples} samples, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| method | wall per point | / bare (wall) | CPU per point | / bare (CPU) | check |")
    print("|---|---:|---:|---:|---:|---|")

    def fmt(v, unit):
        return "n/a" if not np.isfinite(v) else (f"{v * 1e3:.2f} ms" if unit else f"{v:.3f}")

    for name, t, ratio, check in rows:
        print(f"| {name} | {fmt(t[0], 1)} | {fmt(ratio[0], 0)} | {fmt(t[1], 1)} | "
              f"{fmt(ratio[1], 0)} | {check} |")
    print()
    q = t_ours / t_bare
    print(f"- target: ours <= 1.05 x bare forward: {'met' if q[0] <= 1.05 else 'NOT met'} on wall "
          f"time ({q[0]:.3f}), {'met' if q[1] <= 1.05 else 'NOT met'} on CPU time ({q[1]:.3f}); "
          f"grids repeated {args.repeats}x (best kept), bare forward = median of 10 calls "
          "before and after each grid")
    print(f"- ours: L(origin) = {result.loss_at_origin:.6f}, {result.nonfinite} non-finite points")
    for note in notes:
        print(f"- {note}")

    paired = paired_points(model, x, y, d1, d2, args.paired, with_peer=bool(peer))
    print(f"\n### Per point, interleaved point by point ({args.paired} rounds, CPU time)\n")
    print("| method | median CPU per point | median paired ratio to bare forward |")
    print("|---|---:|---:|")
    names = {"bare": "bare forward", "ours": "ours (move + cached evaluation)",
             "peer": "loss-landscapes (add_ + Loss metric)"}
    for key, v in paired.items():
        print(f"| {names[key]} | {np.median(v) * 1e3:.2f} ms | "
              f"{np.median(v / paired['bare']):.3f} |")
    if "peer" in paired:
        print(f"\n- ours / loss-landscapes, paired median: "
              f"{np.median(paired['ours'] / paired['peer']):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
