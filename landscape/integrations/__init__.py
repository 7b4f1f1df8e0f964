"""Framework hooks for optimizers whose parameters live at a perturbed point (MSAM, NAG, AdamW-MSAM).

* :mod:`landscape.integrations.lightning`: :class:`~landscape.integrations.MSAMCallback`,
  a PyTorch Lightning callback (extra ``lightning``);
* :mod:`landscape.integrations.huggingface`:
  :class:`~landscape.integrations.MSAMTrainerCallback`, a Hugging Face
  ``transformers`` ``TrainerCallback`` (extra ``huggingface``).

Both move the parameters to the unperturbed weights ``w`` (``optimizer.eval()``) before
validation, testing and checkpoint saving and back to ``w~`` (``optimizer.train()``) before the
next training step, recompute the BatchNorm statistics at ``w`` when training ends
(:func:`msam.recalibrate_batchnorm`) and optionally run an :class:`analysis.CurvatureTracker`
after every optimizer step. The frameworks are imported only when the submodule is imported, so
the toolkit works without them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MSAMCallback", "MSAMTrainerCallback", "perturbed_optimizers"]


def perturbed_optimizers(optimizers: Any) -> list[Any]:
    """The optimizers among ``optimizers`` (one or a list; wrappers with an ``.optimizer``
    attribute such as accelerate's are unwrapped) that have ``eval()``/``train()`` for a
    perturbed point, i.e. :class:`msam.PerturbedOptimizer` instances."""
    from msam import PerturbedOptimizer

    if optimizers is None:
        return []
    if not isinstance(optimizers, (list, tuple)):
        optimizers = [optimizers]
    out = []
    for opt in optimizers:
        seen = 0
        while not isinstance(opt, PerturbedOptimizer) and hasattr(opt, "optimizer") and seen < 5:
            opt = opt.optimizer
            seen += 1
        if isinstance(opt, PerturbedOptimizer) and all(opt is not o for o in out):
            out.append(opt)
    return out


def __getattr__(name: str) -> Any:
    if name == "MSAMCallback":
        from .lightning import MSAMCallback

        return MSAMCallback
    if name == "MSAMTrainerCallback":
        from .huggingface import MSAMTrainerCallback

        return MSAMTrainerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
