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
        self.dtype = {"float32": torch.float32, "float64": torch.float64,
                      "bfloat16": torch.bfloat16, "float16": torch.float16, None: None}[args.dtype]
        if self.dtype in (torch.bfloat16, torch.float16):
            from analysis.precision import precision_floor

            ctx.log(f"warning: --dtype {args.dtype}: products are rounded to machine epsilon "
                    f"{torch.finfo(self.dtype).eps:.2g}, so eigenvalue bounds stop at about "
                    f"{precision_floor(self.dtype):.2g} |lambda| or more (Lanczos then reports "
                    "converged=False at the precision floor); use float32 for tighter bounds")
        from analysis.distributed import all_ranks_succeed

        # under torchrun: a failure on any rank stops every rank here, named by rank 0
        with all_ranks_succeed("loading the data and the model"):
            self.data = load_data(args.data, batch_size=args.batch_size,
                                  max_samples=args.max_samples, shard=ctx.distributed)
            if check_data is not None:
                check_data(self.data)
            # build one model now: a bad spec or data that do not fit fail before any work
            self._spare: Any = self.model()
            if check_model is not None:
                check_model(self._spare)
            self.check_fit(self._spare)
            sizes = self.data_sizes() if ctx.distributed else None
        if sizes is not None:
            self.check_data_sizes(sizes)
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

    def data_sizes(self) -> tuple[int | None, int | None]:
        """(samples of the whole data, this rank's share); ``None`` where it would take a pass
        over a DataLoader (the whole: ``len(loader.dataset)`` when it has one)."""
        from analysis.data import DataSource

        src = self.data
        if src.kind == "loader":
            try:
                return len(src.data.dataset), None
            except TypeError:  # an IterableDataset without __len__
                return None, None
        whole = DataSource(src.data, batch_size=src.batch_size, max_samples=src.max_samples)
        return whole.num_samples(), src.num_samples()

    def check_data_sizes(self, sizes: tuple[int | None, int | None]) -> None:
        """Under torchrun: refuse data whose size differs across ranks (every rank must load
        the same data and take its share), naming the ranks; report each rank's share."""
        from analysis.distributed import all_gather_object

        every = all_gather_object(sizes)
        totals = [t for t, _ in every]
        differ = [r for r, t in enumerate(totals) if t != totals[0]]
        if differ:
            listed = ", ".join(f"rank {r}: {'?' if t is None else t}" for r, t in enumerate(totals))
            raise CLIError(f"--data differs across ranks ({listed} samples); every rank must load "
                           "the same data (each takes its share)")
        shares = [n for _, n in every]
        if totals[0] is not None:
            share = "" if None in shares else " (per rank: " + ", ".join(map(str, shares)) + ")"
            self.ctx.log(f"data: {totals[0]} samples on {len(every)} ranks{share}")

    def check_memory(self, costs: list, model: Any = None, *, ignore: bool = False) -> Any:
        """:func:`landscape.cli.memory.check_memory` of the planned ``costs`` on ``model`` (default:
        a model of the spec; its activations do not depend on the weights) and the data; raises
        :class:`CLIError` when the estimate exceeds the available memory unless
        ``--no-memory-check`` (or ``ignore``: the estimate only, e.g. for ``--fsdp auto``)."""
        from .memory import check_memory

        if model is None:
            model = self._spare if getattr(self, "_spare", None) is not None else self.model()
            self._spare = model  # the next model() call takes it
        return check_memory(costs, model, self.loss_fn, self.data, log=self.ctx.log,
                            ignore=ignore or bool(getattr(self.args, "no_memory_check", False)))

    def load(self, path: pathlib.Path) -> tuple[Any, Any]:
        """A fresh model with the checkpoint's weights, and the :class:`Checkpoint`. Under
        torchrun every rank loads (a failure on any stops all, named by rank 0) and the
        weights' fingerprints are compared: ranks that read other weights are refused."""
        from analysis.distributed import all_ranks_succeed, check_same_weights

        with all_ranks_succeed("loading the checkpoint"):
            model, ckpt = self._load(path)
        check_same_weights(model, f"the weights loaded from {path}")
        return model, ckpt

    def _load(self, path: pathlib.Path) -> tuple[Any, Any]:
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
