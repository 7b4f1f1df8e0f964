"""PyTorch Lightning callback for MSAM-style optimizers (``pip install msam-landscape[lightning]``).

Example:
    >>> import lightning.pytorch as pl                                   # doctest: +SKIP
    >>> from landscape.integrations import MSAMCallback          # doctest: +SKIP
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
* BatchNorm: the running statistics gathered during training belong to the perturbed points
  ``w~`` (a ResNet-18 checkpoint was up to 1.9 off, eval loss 2,300 vs 4.9 recalibrated). With
  ``recalibrate`` on (default), statistics at ``w`` are recomputed
  (:func:`msam.recalibrate_batchnorm` on the training data or ``recalibrate_data``, at most
  ``recalibrate_batches`` batches) for every validation (swapped in, the training statistics
  swapped back after it) and written into every checkpoint, so ``last.ckpt`` holds ``w`` with
  statistics gathered at ``w`` and the logged validation metrics are those of the checkpoint.
  The live training state (parameters, statistics, the global RNG) is restored bit for bit, so
  the trajectory is unchanged; the cost is one pass over the recalibration data per new ``w``
  (validation and checkpoint of the same step share it);
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

import torch
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
            "'msam-landscape[lightning]' (or lightning)") from exc


class MSAMCallback(Callback):
    """Evaluate, test and checkpoint MSAM-trained models at the unperturbed weights ``w``.

    Args:
        recalibrate: recompute BatchNorm statistics at ``w`` for validation, for every
            checkpoint and when ``fit`` ends (default True; see the module docstring).
        recalibrate_data: data for the recalibration (an ``(X, y)`` pair or a DataLoader; default
            the trainer's training dataloader).
        recalibrate_batches: at most this many batches per recalibration (default all).
        tracker: a :class:`analysis.CurvatureTracker`, or a callable
            ``(module, optimizer) -> CurvatureTracker`` called when training starts (for a
            tracker that needs the optimizer Lightning creates).
        stay_at_w: leave the parameters at ``w`` after ``fit`` (default True).

    Attributes:
        tracker: the tracker in use (None without one); its ``history`` holds the checks.
    """

    def __init__(self, *, recalibrate: bool = True, recalibrate_data: Any = None,
                 recalibrate_batches: int | None = None, tracker: Any = None,
                 stay_at_w: bool = True):
        super().__init__()
        if tracker is not None and not (hasattr(tracker, "maybe_measure") or callable(tracker)):
            raise TypeError(f"tracker must be a CurvatureTracker or a callable, got {type(tracker).__name__}")
        if recalibrate_batches is not None and (isinstance(recalibrate_batches, bool) or not
                                                isinstance(recalibrate_batches, int)
                                                or recalibrate_batches < 1):
            raise ValueError(f"recalibrate_batches must be a positive integer or None, got "
                             f"{recalibrate_batches!r}")
        self.recalibrate = bool(recalibrate)
        self.recalibrate_data = recalibrate_data
        self.recalibrate_batches = recalibrate_batches
        self._bn_cache: tuple[int, dict[str, torch.Tensor]] | None = None  # (step, statistics)
        self._live_bn: dict[str, torch.Tensor] | None = None  # training statistics, swapped out
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

    # -- BatchNorm statistics at w ---------------------------------------------------------
    @staticmethod
    def _bn_buffers(module: Any) -> dict[str, torch.Tensor]:
        """The buffers of the module's BatchNorm layers, by state-dict name."""
        out = {}
        for name, m in module.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for bname, b in m.named_buffers(recurse=False):
                    if b is not None:
                        out[f"{name}.{bname}" if name else bname] = b
        return out

    @classmethod
    def _load_bn(cls, module: Any, stats: dict[str, torch.Tensor]) -> None:
        """Copy ``stats`` into the module's BatchNorm buffers in place."""
        live = cls._bn_buffers(module)
        with torch.no_grad():
            for k, v in stats.items():
                live[k].copy_(v)

    def _recalibration_data(self, trainer: Any) -> Any:
        data = self.recalibrate_data
        if data is None and not getattr(trainer, "sanity_checking", False):
            data = getattr(trainer, "train_dataloader", None)
        return data

    def _stats_at_w(self, trainer: Any, pl_module: Any) -> dict[str, torch.Tensor] | None:
        """BatchNorm statistics recomputed at ``w`` (None when they do not apply: no BatchNorm,
        no MSAM-style optimizer, ``recalibrate`` off, no data yet); cached per global step. The
        module's parameters, buffers and modes and the global RNG are restored."""
        opts = self._opts(trainer)
        if not (self.recalibrate and opts and self._bn_buffers(pl_module)):
            return None
        step = int(getattr(trainer, "global_step", -1))
        if self._bn_cache is not None and self._bn_cache[0] == step:
            return self._bn_cache[1]
        data = self._recalibration_data(trainer)
        if data is None:
            return None
        perturbed = [o for o in opts if o.is_perturbed]
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), preserved_state(pl_module), \
                _all_unperturbed(perturbed):
            recalibrate_batchnorm(pl_module, data, max_batches=self.recalibrate_batches)
            stats = {k: v.detach().clone() for k, v in self._bn_buffers(pl_module).items()}
        self._bn_cache = (step, stats)
        return stats

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
        stats = self._stats_at_w(trainer, pl_module)  # those of the last checkpoint, if saved
        if stats is not None:
            self._load_bn(pl_module, stats)
        if not self.stay_at_w:
            for opt in opts:
                opt.train()

    # -- evaluation ------------------------------------------------------------------------
    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._to_w(trainer)
        stats = self._stats_at_w(trainer, pl_module) if self._fitting else None
        if stats is not None:  # validate w with statistics of w; the training ones come back
            self._live_bn = {k: v.detach().clone() for k, v in self._bn_buffers(pl_module).items()}
            self._load_bn(pl_module, stats)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._live_bn is not None:
            self._load_bn(pl_module, self._live_bn)
            self._live_bn = None
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
        stats = self._stats_at_w(trainer, pl_module) if self._fitting else None
        opts = [o for o in self._opts(trainer) if o.is_perturbed]
        if not opts and stats is None:
            return
        # the live parameters come back bit for bit (not w~ recomputed from w)
        with preserved_state(pl_module), _all_unperturbed(opts):
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        if stats is not None:  # BatchNorm statistics gathered at w, not at w~
            state.update({k: v.clone() for k, v in stats.items() if k in state})
        checkpoint["state_dict"] = state
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
