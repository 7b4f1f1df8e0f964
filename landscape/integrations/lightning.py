"""PyTorch Lightning callback for MSAM-style optimizers (``pip install landscape[lightning]``).

Example:
    >>> import lightning.pytorch as pl                                   # doctest: +SKIP
    >>> from landscape.integrations.lightning import MSAMCallback          # doctest: +SKIP
    >>> trainer = pl.Trainer(max_epochs=2, callbacks=[MSAMCallback()])    # doctest: +SKIP
    >>> trainer.fit(module, train_loader, val_loader)                     # doctest: +SKIP

What :class:`MSAMCallback` does with every :class:`msam.PerturbedOptimizer` of the trainer
(:class:`msam.MSAM`, :class:`msam.NAG`, :class:`msam.AdamWMSAM`):

* ``optimizer.eval()`` (parameters at ``w``) at the start of validation (also the sanity check),
  testing and prediction, and ``optimizer.train()`` (back to ``w~``) at their end and at the start
  of every training batch;
* on checkpoint saving, the checkpoint's ``state_dict`` is replaced by the weights at ``w``
  (computed in ``optimizer.unperturbed()``, the live parameters untouched) and the saved optimizer
  states are marked unperturbed, so loading the checkpoint for inference or resuming gives ``w``
  with a consistent optimizer;
* at the end of ``fit``: ``optimizer.eval()`` and, if the module has BatchNorm layers and
  ``recalibrate`` is on, :func:`msam.recalibrate_batchnorm` on the training data (or
  ``recalibrate_data``), as the MSAM authors do;
* with ``tracker=``: after every optimizer step, ``tracker.maybe_measure(trainer.global_step)``
  (a tracker that raises is named in a :class:`~landscape.integrations.failures.TrackerError`);
* on any exception of ``fit`` (a crash, Ctrl-C: Lightning's ``on_exception`` hook):
  ``optimizer.eval()``, so the parameters are left at ``w``, never at ``w~``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from analysis.sharpness import preserved_state
from msam import recalibrate_batchnorm

from . import perturbed_optimizers
from .failures import measure, restore_w

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the standalone package
    try:
        from pytorch_lightning import Callback
    except ImportError as exc:
        raise ImportError(
            "landscape.integrations.lightning needs PyTorch Lightning: pip install "
            "'landscape[lightning]' (or lightning)") from exc

__all__ = ["MSAMCallback"]


class MSAMCallback(Callback):
    """Evaluate, test and checkpoint MSAM-trained models at the unperturbed weights ``w``.

    Args:
        recalibrate: recompute BatchNorm statistics at ``w`` when ``fit`` ends (default True).
        recalibrate_data: data for the recalibration (an ``(X, y)`` pair or a DataLoader; default
            the trainer's training dataloader).
        tracker: a :class:`analysis.tracker.CurvatureTracker`, or a callable
            ``(module, optimizer) -> CurvatureTracker`` called when training starts (for a
            tracker that needs the optimizer Lightning creates).
        stay_at_w: leave the parameters at ``w`` after ``fit`` (default True).

    Attributes:
        tracker: the tracker in use (None without one); its ``history`` holds the checks.
    """

    def __init__(self, *, recalibrate: bool = True, recalibrate_data: Any = None,
                 tracker: Any = None, stay_at_w: bool = True):
        super().__init__()
        if tracker is not None and not (hasattr(tracker, "maybe_measure") or callable(tracker)):
            raise TypeError(f"tracker must be a CurvatureTracker or a callable, got {type(tracker).__name__}")
        self.recalibrate = bool(recalibrate)
        self.recalibrate_data = recalibrate_data
        self._tracker_arg: Any = tracker
        self.tracker: Any = tracker if hasattr(tracker, "maybe_measure") else None
        self.stay_at_w = bool(stay_at_w)
        self._fitting = False
        self._last_step = -1

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _opts(trainer: Any) -> list[Any]:
        return perturbed_optimizers(list(getattr(trainer, "optimizers", []) or []))

    def _to_w(self, trainer: Any) -> None:
        for opt in self._opts(trainer):
            opt.eval()

    def _to_w_tilde(self, trainer: Any) -> None:
        if not self._fitting:
            return
        for opt in self._opts(trainer):
            opt.train()

    # -- training --------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._fitting = True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.tracker is None and callable(self._tracker_arg):
            opts = list(getattr(trainer, "optimizers", []) or [])
            self.tracker = self._tracker_arg(pl_module, opts[0] if opts else None)
        self._to_w_tilde(trainer)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._to_w_tilde(trainer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = int(trainer.global_step)
        # with gradient accumulation several batches share one optimizer step: measure once
        if self.tracker is not None and step != self._last_step:
            self._last_step = step
            measure(self.tracker, step)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Any exception of ``fit``, ``validate``... (Ctrl-C included): parameters back to ``w``."""
        self._fitting = False
        restore_w(list(getattr(trainer, "optimizers", []) or []))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._fitting = False
        opts = self._opts(trainer)
        for opt in opts:
            opt.eval()
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in pl_module.modules())
        if self.recalibrate and has_bn and opts:
            data = self.recalibrate_data
            if data is None:
                data = trainer.train_dataloader
            if data is not None:
                recalibrate_batchnorm(pl_module, data)
        if not self.stay_at_w:
            for opt in opts:
                opt.train()

    # -- evaluation ------------------------------------------------------------------------
    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._to_w(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._to_w_tilde(trainer)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._to_w(trainer)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._to_w_tilde(trainer)

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._to_w(trainer)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._to_w_tilde(trainer)

    # -- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        opts = [o for o in self._opts(trainer) if o.is_perturbed]
        if not opts:
            return
        # the live parameters come back bit for bit (not w~ recomputed from w)
        with preserved_state(pl_module), _all_unperturbed(opts):
            checkpoint["state_dict"] = {k: v.detach().clone()
                                        for k, v in pl_module.state_dict().items()}
        for state in checkpoint.get("optimizer_states", []) or []:
            if isinstance(state, dict) and state.get("perturbed"):
                state["perturbed"] = False
                for group in state.get("param_groups", []):
                    group["perturbation_scale"] = None

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict()} if self.tracker is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.tracker is not None and "tracker" in state_dict:
            self.tracker.load_state_dict(state_dict["tracker"])


class _all_unperturbed:
    """Nested ``unperturbed()`` contexts of several optimizers."""

    def __init__(self, opts: list[Any]):
        self.ctxs = [o.unperturbed() for o in opts]

    def __enter__(self) -> None:
        for c in self.ctxs:
            c.__enter__()

    def __exit__(self, *exc: Any) -> None:
        for c in reversed(self.ctxs):
            c.__exit__(*exc)
