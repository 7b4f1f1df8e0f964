"""Hugging Face ``transformers`` callback for MSAM-style optimizers (``pip install msam-landscape[huggingface]``).

Example:
    >>> from transformers import Trainer                                       # doctest: +SKIP
    >>> from landscape.integrations import MSAMTrainerCallback      # doctest: +SKIP
    >>> opt = msam.AdamWMSAM(model.parameters(), lr=1e-4, rho=0.3)              # doctest: +SKIP
    >>> trainer = Trainer(model, args, train_dataset=ds, eval_dataset=ev,       # doctest: +SKIP
    ...                   optimizers=(opt, None), callbacks=[MSAMTrainerCallback()])

``transformers`` has no hook *before* evaluation or saving, but the flow callback decides both at
the end of a step or epoch (``control.should_evaluate`` / ``control.should_save``), and this
callback runs after it. :class:`MSAMTrainerCallback` then:

* calls ``optimizer.eval()`` (parameters at ``w``) at ``on_step_end`` / ``on_epoch_end`` when
  the trainer is about to evaluate or save, so metrics and saved weights (and the saved optimizer
  state, marked unperturbed) are those of ``w``, and ``optimizer.train()`` (back to ``w~``) at the
  next ``on_step_begin``;
* at ``on_train_end``: ``optimizer.eval()`` and, for models with BatchNorm,
  :func:`msam.recalibrate_batchnorm` on ``recalibrate_data`` or the training dataloader;
* with ``tracker=``: ``tracker.maybe_measure(state.global_step)`` after every optimizer step
  (a tracker that raises is named in a :class:`~landscape.integrations.failures.TrackerError`);
* on any exception of ``trainer.train()`` (a crash, Ctrl-C): ``optimizer.eval()``, so the
  parameters are left at ``w``, never at ``w~``. transformers has no exception hook, so the
  callback wraps ``trainer.train`` in a ``try``/``except`` (:meth:`MSAMTrainerCallback.guard`):
  automatically for a callback passed as ``Trainer(callbacks=[...])`` (found at
  ``on_init_end``), by hand (``callback.guard(trainer)``) for one added later with
  ``trainer.add_callback``.

``trainer.evaluate()`` called by hand after training sees ``w`` (the parameters stay there); in
the middle of training call ``optimizer.eval()`` yourself first.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

from msam import recalibrate_batchnorm

from . import perturbed_optimizers
from .failures import measure, restore_w

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover
    raise ImportError("landscape.integrations.huggingface needs transformers: pip install "
                      "'msam-landscape[huggingface]'") from exc


class MSAMTrainerCallback(TrainerCallback):
    """Evaluate and save MSAM-trained ``transformers`` models at the unperturbed weights ``w``.

    Args:
        recalibrate: recompute BatchNorm statistics at ``w`` when training ends (default True;
            nothing happens for models without BatchNorm).
        recalibrate_data: data for the recalibration (default: the trainer's training
            dataloader; its batches must be what the model's ``forward`` takes: a dict of
            tensors is passed as keyword arguments).
        tracker: a :class:`analysis.CurvatureTracker`, or a callable
            ``(model, optimizer) -> CurvatureTracker`` called at the first step.

    Attributes:
        tracker: the tracker in use (None without one).
    """

    def __init__(self, *, recalibrate: bool = True, recalibrate_data: Any = None,
                 tracker: Any = None):
        if tracker is not None and not (hasattr(tracker, "maybe_measure") or callable(tracker)):
            raise TypeError(f"tracker must be a CurvatureTracker or a callable, got {type(tracker).__name__}")
        self.recalibrate = bool(recalibrate)
        self.recalibrate_data = recalibrate_data
        self._tracker_arg = tracker
        self.tracker: Any = tracker if hasattr(tracker, "maybe_measure") else None
        self._last_step = -1
        self._seen: list[Any] = []  # the optimizers of the current training

    def guard(self, trainer: Any) -> Any:
        """Wrap ``trainer.train`` so that any exception (Ctrl-C included) leaves the parameters
        at ``w``; adds this callback to ``trainer`` if it is not there. Idempotent; returns
        ``trainer``. Done automatically for a callback given as ``Trainer(callbacks=[...])``."""
        if not callable(getattr(trainer, "train", None)) or not hasattr(trainer, "add_callback"):
            raise TypeError(f"guard() expects a transformers Trainer, got {type(trainer).__name__}")
        handler = getattr(trainer, "callback_handler", None)
        if handler is not None and all(c is not self for c in handler.callbacks):
            trainer.add_callback(self)
        if getattr(trainer.train, "_msam_guard", None) is self:
            return trainer
        train = trainer.train

        @functools.wraps(train)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return train(*args, **kwargs)
            except BaseException:
                restore_w([getattr(trainer, "optimizer", None), *self._seen])
                raise

        guarded._msam_guard = self  # type: ignore[attr-defined]
        trainer.train = guarded
        return trainer

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = _calling_trainer()
        if trainer is not None:
            self.guard(trainer)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._seen = self._opts(kwargs)

    def _opts(self, kwargs: dict[str, Any]) -> list[Any]:
        opts = perturbed_optimizers(kwargs.get("optimizer"))
        self._seen += [o for o in opts if all(o is not s for s in self._seen)]
        return opts

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for opt in self._opts(kwargs):
            opt.train()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker is None and self._tracker_arg is not None:
            self.tracker = self._tracker_arg(kwargs.get("model"), kwargs.get("optimizer"))
        if self.tracker is not None and int(state.global_step) != self._last_step:
            self._last_step = int(state.global_step)
            measure(self.tracker, self._last_step)
        self._maybe_to_w(control, kwargs)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._maybe_to_w(control, kwargs)

    def _maybe_to_w(self, control: Any, kwargs: dict[str, Any]) -> None:
        if getattr(control, "should_evaluate", False) or getattr(control, "should_save", False):
            for opt in self._opts(kwargs):
                opt.eval()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        opts = self._opts(kwargs)
        for opt in opts:
            opt.eval()
        model = kwargs.get("model")
        if not (self.recalibrate and opts and isinstance(model, nn.Module)):
            return
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            data = self.recalibrate_data
            if data is None:
                data = kwargs.get("train_dataloader")
            if data is not None:
                _recalibrate(model, data)


def _calling_trainer() -> Any:
    """The ``transformers.Trainer`` whose method called this callback (its ``__init__`` for
    ``on_init_end``), found on the call stack; ``None`` if there is none."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer):
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame


_INPUT_KEYS = ("pixel_values", "input_values", "input_ids", "inputs_embeds", "inputs", "x")


class _KeywordModel(nn.Module):
    """Calls ``model(**{key: tensor})``: lets recalibrate_batchnorm feed dict batches."""

    def __init__(self, model: nn.Module, key: str):
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, tensor: Any) -> Any:
        return self.model(**{self.key: tensor})


def _recalibrate(model: nn.Module, data: Any) -> None:
    """recalibrate_batchnorm for tensor batches and for ``transformers``-style dict batches
    (the model input is the first of ``pixel_values``, ``input_values``, ``input_ids``, ...)."""
    it = iter(data)
    try:
        first = next(it)
    except StopIteration:
        return
    if not isinstance(first, dict):
        recalibrate_batchnorm(model, data)
        return
    key = next((k for k in _INPUT_KEYS if k in first), None)
    if key is None:
        raise ValueError(f"cannot find the model input among the batch keys {sorted(first)}; "
                         "pass recalibrate_data= (an (X, y) pair)")
    recalibrate_batchnorm(_KeywordModel(model, key), [(b[key], None) for b in data])
