"""The one exception path of the framework callbacks: after any exception inside training
(a crash, ``KeyboardInterrupt``) the parameters of every perturbed optimizer go back to the
unperturbed weights ``w`` (:func:`restore_w`), and a curvature tracker that fails is named in
the error (:func:`measure`), so the user knows which of their objects raised.

PyTorch Lightning calls :meth:`~landscape.integrations.lightning.MSAMCallback.on_exception` for
every exception of ``fit`` (Ctrl-C included). The Hugging Face ``Trainer`` has no such hook, so
:meth:`~landscape.integrations.huggingface.MSAMTrainerCallback.guard` wraps ``trainer.train`` in
a ``try``/``except BaseException`` that calls :func:`restore_w` and re-raises.
"""

from __future__ import annotations

from typing import Any

from . import perturbed_optimizers

__all__ = ["TrackerError", "measure", "restore_w"]


class TrackerError(RuntimeError):
    """A curvature tracker raised during training; the message names the tracker and the step,
    the original exception is the ``__cause__``."""


def measure(tracker: Any, step: int) -> None:
    """``tracker.maybe_measure(step)``, an exception re-raised as :class:`TrackerError` naming
    the tracker (its ``repr``) and the step."""
    try:
        tracker.maybe_measure(step)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TrackerError(
            f"the curvature tracker {tracker!r} failed at step {step}: {type(exc).__name__}: "
            f"{text} (the parameters were moved back to the unperturbed weights w)") from exc


def restore_w(optimizers: Any) -> None:
    """``optimizer.eval()`` for every perturbed optimizer among ``optimizers`` (parameters at
    ``w``); each is tried even if another fails, the first failure is re-raised."""
    first: BaseException | None = None
    for opt in perturbed_optimizers(optimizers):
        try:
            opt.eval()
        except Exception as exc:  # pragma: no cover - eval() validates before moving
            first = first or exc
    if first is not None:
        raise first
