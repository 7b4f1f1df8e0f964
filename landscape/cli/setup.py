"""The model factory, data, loss and device of an analysis command, checked before any data pass."""

from __future__ import annotations

import argparse
import pathlib
import warnings
from collections.abc import Callable
from typing import Any

from ._common import CLIError, UsageError
from ._common import first_line as _first_line
from .output import Ctx
from .specs import load_data, load_model, resolve_loss

__all__ = ["Setup"]


class Setup:
    """Model factory, data, loss and device for the analysis commands."""

    def __init__(self, args: argparse.Namespace, ctx: Ctx, *,
                 check_data: Callable[[Any], None] | None = None,
                 check_model: Callable[[Any], None] | None = None):
        """``check_data(source)`` runs right after the data is loaded, ``check_model(model)``
        right after the model is built, both before any forward pass (for option values that
        depend on the data size or the number of parameters)."""
        import torch

        self.args = args
        self.ctx = ctx
        self.loss_fn = resolve_loss(args.loss)
        try:
            self.device = torch.device(args.device)
        except RuntimeError as exc:
            raise UsageError(f"--device {args.device!r}: {_first_line(exc)}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise CLIError(f"--device {args.device}: CUDA is not available on this machine")
        self.dtype = {"float32": torch.float32, "float64": torch.float64, None: None}[args.dtype]
        self.data = load_data(args.data, batch_size=args.batch_size, max_samples=args.max_samples,
                              shard=ctx.distributed)
        if check_data is not None:
            check_data(self.data)
        # build one model now: a bad spec or data that do not fit fail before any work
        self._spare: Any = self.model()
        if check_model is not None:
            check_model(self._spare)
        self.check_fit(self._spare)
        trainable = [p for p in self._spare.parameters() if p.requires_grad]
        #: trainable parameters ``n`` and bytes per entry of the model (for the cost estimates)
        self.num_params = sum(p.numel() for p in trainable)
        self.itemsize = trainable[0].element_size() if trainable else 4

    def model(self) -> Any:
        spare, self._spare = getattr(self, "_spare", None), None
        if spare is not None:
            return spare
        m = load_model(self.args.model)
        if self.dtype is not None:
            m = m.to(self.dtype)
        return m.to(self.device)

    def load(self, path: pathlib.Path) -> tuple[Any, Any]:
        """A fresh model with the checkpoint's weights, and the :class:`Checkpoint`."""
        from ..checkpoints.loading import load_checkpoint

        model = self.model()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ckpt = load_checkpoint(path, model, map_location=self.device, strict=not self.args.non_strict,
                                   allow_pickle=self.args.trust_pickle, prefix=getattr(self.args, "prefix", None))
        for w in caught:
            self.ctx.log(f"warning: {w.message}")
        from ..report import checkpoint_keys, describe_checkpoint_keys

        text = describe_checkpoint_keys(checkpoint_keys(ckpt))
        if text:
            self.ctx.log(f"warning: {path}: {text}")
        return model, ckpt

    def check_fit(self, model: Any) -> None:
        """Run the first batch through the model: wrong shapes fail here in one line."""
        import torch

        from analysis.data import DataSource, to_device
        from analysis.evaluation import forward, model_device_dtype, model_mode
        from analysis.target_checks import check_lm_targets

        device, dtype = model_device_dtype(model)
        src = self.data
        unsharded = DataSource(src.data, batch_size=src.batch_size, max_samples=src.max_samples)
        batch = next(iter(unsharded))
        try:
            with torch.no_grad(), model_mode(model, "eval"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. mse broadcasting: the error below says it
                out = forward(model, to_device(batch.inputs, device, dtype))
        except Exception as exc:
            raise self._misfit(exc, None, None) from None
        targets = to_device(batch.targets, device, dtype)
        try:  # a language model's logits under cross_entropy / mse: say to use --loss lm
            check_lm_targets(self.loss_fn, out, targets, batch.index,
                             "the data does not fit the model", cli=True)
        except (TypeError, ValueError) as exc:
            raise CLIError(_first_line(exc)) from None
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss = self.loss_fn(out, targets)
        except Exception as exc:
            raise self._misfit(exc, out, targets) from None
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise CLIError("the loss function must return a scalar (the batch mean)")

    def _misfit(self, exc: Exception, out: Any, targets: Any) -> CLIError:
        """The one-line error for a first batch whose loss failed, with a hint by output shape."""
        from analysis.target_checks import lm_hint, looks_like_lm

        if out is not None and looks_like_lm(out, targets):
            hint = f"; the outputs are a language model's (B, T, V) logits: {lm_hint(cli=True)}"
        elif self.args.loss == "mse":
            hint = ("; --loss mse needs float targets shaped like the outputs (class labels need "
                    "cross_entropy)")
        else:
            hint = ""
        return CLIError(
            f"the data does not fit the model: {type(exc).__name__}: {_first_line(exc)}{hint}"
        )
