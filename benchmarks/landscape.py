"""Benchmark: 2-D loss-landscape slice, per-point cost against a bare forward pass and loss-landscapes.

Setup: the demo CNN (``landscape.models.digits_cnn``, ~151k parameters, BatchNorm in eval mode),
512 digits images, a 21 x 21 grid on the plane of two filter-normalized random directions; and,
where the per-point overhead shows, a small MLP (64-64-10, 256 random samples, ~5k parameters).

Main table: whole grids interleaved in rounds, in the same process. Each round times, in an
order that rotates from round to round,

* ``bare forward``: ``F.cross_entropy(model(x), y).item()`` under ``no_grad``, 441 times (the
  floor: one forward pass per grid point);
* ``slice_2d``: our whole call (data caching, the first-batch checks, the origin, 441 points,
  exact restore);
* with ``--baseline REV``: ``slice_2d`` of the ``landscape/slices`` package at git revision
  ``REV``, loaded next to the current one (``benchmarks/baseline.py``);
* ``loss-landscapes``: ``planar_interpolation`` of the same plane, the whole 21 x 21 grid (its
  per-point loop of in-place adds and a ``Loss`` metric), when the package imports;

and each round's times are divided by the same round's bare forward passes; the table gives the
median over rounds (whole grids and bare forward passes timed in separate windows are at the
mercy of the machine's load: the previous version of this benchmark gave per-point ratios from
0.76 to 1.97 for the same code). The values of
loss-landscapes are compared with ours at the coordinates it actually evaluates (its even rows
are shifted by one step along ``d2``).

A second table interleaves point by point (one bare forward, one point of ours, one point of
loss-landscapes per round) and reports median CPU-time ratios.

Run: ``python benchmarks/landscape.py [--baseline REV]``. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

from analysis import ParameterSpace, random_direction  # noqa: E402
from landscape import slice_2d  # noqa: E402
from landscape.datasets import load_digits  # noqa: E402
from landscape.models import digits_cnn  # noqa: E402


def _clock() -> np.ndarray:
    """(wall seconds, CPU seconds of this process): CPU time is less disturbed by other load."""
    return np.array([time.perf_counter(), time.process_time()])


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


def grid_rounds(model, x, y, d1, d2, steps: int, rounds: int, slicers: dict,
                with_peer: bool) -> dict[str, np.ndarray]:
    """Whole grids interleaved: per round (order rotated) ``steps**2`` bare forward passes, one
    ``slice_2d`` grid per entry of ``slicers`` and the peer's grid. Returns, per method, the
    ``(rounds, 2)`` (wall, CPU) seconds per point."""
    coords = np.linspace(-1, 1, steps)
    points = steps**2

    def bare():
        model.eval()
        with torch.no_grad():
            for _ in range(points):
                F.cross_entropy(model(x), y).item()

    runs = [("bare", bare)]
    for name, fn in slicers.items():
        runs.append((name, lambda fn=fn: fn(model, "cross_entropy", (x, y), d1, d2, coords,
                                              coords, metrics=("loss",), progress=False)))
    if with_peer:  # its own clock: the copies of the model it moves are set up untimed
        runs.append(("peer", lambda: peer_grid(model, x, y, d1, d2, steps, None)[0]))
    bare()  # warm-up
    out: dict[str, list] = {name: [] for name, _ in runs}
    for r in range(rounds):
        for name, fn in runs[r % len(runs):] + runs[:r % len(runs)]:
            t = _clock()
            timed = fn()
            t = timed if name == "peer" else _clock() - t
            out[name].append(t / points)
    return {k: np.array(v) for k, v in out.items()}


def print_rounds(title: str, times: dict[str, np.ndarray], names: dict[str, str]) -> None:
    print(f"\n### {title}\n")
    print("| method | wall per point | / bare (wall) | CPU per point | / bare (CPU) |")
    print("|---|---:|---:|---:|---:|")
    bare = times["bare"]
    for key, t in times.items():
        ratio = np.median(t / bare, axis=0)
        med = np.median(t, axis=0)
        print(f"| {names.get(key, key)} | {med[0] * 1e3:.3f} ms | {ratio[0]:.3f} | "
              f"{med[1] * 1e3:.3f} ms | {ratio[1]:.3f} |")
    if "peer" in times:
        for key in times:
            if key not in ("bare", "peer"):
                r = np.median(times[key] / times["peer"], axis=0)
                print(f"\n- {names.get(key, key)} / loss-landscapes, median over rounds: "
                      f"{r[0]:.3f} (wall), {r[1]:.3f} (CPU)")


def peer_check(model, x, y, d1, d2, steps: int, rows: int) -> str:
    """Max relative difference between the peer's values and ours at the points it evaluates
    (``start + i/steps D1 + (j + [i even])/steps D2``, accumulated by repeated in-place adds)."""
    _, grid, pr = peer_grid(model, x, y, d1, d2, steps, rows)
    ref_model = copy.deepcopy(model)
    xs_p = np.arange(pr) / steps
    ours_even = slice_2d(ref_model, "cross_entropy", (x, y), d1, d2, xs_p,
                         (np.arange(steps) + 1) / steps, metrics=("loss",), progress=False)
    ours_odd = slice_2d(ref_model, "cross_entropy", (x, y), d1, d2, xs_p,
                        np.arange(steps) / steps, metrics=("loss",), progress=False)
    expect = np.where((np.arange(pr) % 2 == 0)[:, None], ours_even.loss, ours_odd.loss)
    return f"max rel. diff {float(np.max(np.abs(grid - expect) / np.abs(expect))):.1e}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of whole grids")
    parser.add_argument("--paired", type=int, default=40,
                        help="rounds of the point-by-point interleaved measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--peer-rows", type=int, default=5,
                        help="rows of the peer grid compared value by value with ours")
    parser.add_argument("--baseline", default=None,
                        help="a git revision whose landscape/slices is timed alongside")
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
    slicers = {"ours": slice_2d}
    names = {"bare": f"bare forward ({args.samples} samples)", "ours": "ours: slice_2d",
             "peer": "loss-landscapes planar_interpolation"}
    if args.baseline:
        from baseline import load_at

        slicers["baseline"] = load_at(args.baseline, "landscape/slices",
                                      "landscape.slices_at_baseline").slice_2d
        names["baseline"] = f"slice_2d at {args.baseline}"
    peer_error = None
    try:
        import loss_landscapes  # noqa: F401
    except Exception as err:  # pragma: no cover - depends on the environment
        peer_error = f"skipped: cannot import loss_landscapes ({type(err).__name__}: {err})"

    print(f"## 2-D landscape slice: {args.steps}x{args.steps} grid, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    times = grid_rounds(model, x, y, d1, d2, args.steps, args.rounds, slicers, peer_error is None)
    print_rounds(f"digits CNN ({n_params} params), {args.samples} samples", times, names)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    xm, ym = torch.randn(256, 64), torch.randint(0, 10, (256,))
    e1 = random_direction(mlp, seed=0)
    e2 = random_direction(mlp, seed=1, orthogonal_to=e1)
    times = grid_rounds(mlp.eval(), xm, ym, e1, e2, args.steps, args.rounds, slicers,
                        peer_error is None)
    print_rounds(f"MLP 64-64-10 ({ParameterSpace(mlp).numel} params), 256 samples", times,
                 {**names, "bare": "bare forward (256 samples)"})
    print()
    if peer_error is None:
        print(f"- loss-landscapes agrees with ours on {args.peer_rows} rows of its grid: "
              f"{peer_check(model, x, y, d1, d2, args.steps, args.peer_rows)}")
    else:
        print(f"- loss-landscapes: {peer_error}")

    paired = paired_points(model, x, y, d1, d2, args.paired, with_peer=peer_error is None)
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
