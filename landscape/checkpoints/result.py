"""What loading returns and raises: :class:`Checkpoint`, :class:`CheckpointError`,
:class:`UnsafeCheckpointError`, :class:`PerturbedCheckpointWarning`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from analysis.results import Result, to_jsonable


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (unreadable, wrong layout, keys or shapes that differ)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would import or call arbitrary objects; it was refused and nothing ran."""


class PerturbedCheckpointWarning(UserWarning):
    """The checkpoint was saved at MSAM's perturbed point and has been moved back."""


@dataclass(frozen=True, repr=False)
class Checkpoint(Result):
    """A loaded checkpoint.

    Attributes:
        path: the file.
        format: ``"torch"`` or ``"safetensors"``.
        state_dict: the model's tensors (prefixes stripped, MSAM perturbation undone).
        optimizer_state: the optimizer ``state_dict`` stored beside the model, if any (of
            several, the first that says it was saved perturbed, else the first).
        optimizer_states: every optimizer ``state_dict`` of the file (PyTorch Lightning's
            ``optimizer_states``, a Hugging Face Trainer folder's ``optimizer.pt``).
        metadata: the other top-level entries (``epoch``, ``step``...) or safetensors metadata.
        missing_keys: model keys absent from the checkpoint (only when a model was given).
        unexpected_keys: checkpoint keys the model does not have.
        shape_mismatches: ``(key, checkpoint_shape, model_shape)`` triples.
        perturbed: the optimizer state says the weights were saved at MSAM's perturbed point.
        unperturbed: the loader moved them back to ``w = w~ + rho * v / ||v||``.
        prefix: the key prefix removed (given as ``prefix=`` or detected), ``""`` if none.
        ignored_keys: checkpoint keys outside ``prefix`` (other attributes of a Lightning
            module, for example); not loaded and not counted as unexpected.
    """

    path: str
    format: str
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer_state: dict[str, Any] | None = None
    optimizer_states: tuple[dict[str, Any], ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    shape_mismatches: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()
    perturbed: bool = False
    unperturbed: bool = False
    prefix: str = ""
    ignored_keys: tuple[str, ...] = ()

    @property
    def num_tensors(self) -> int:
        return len(self.state_dict)

    @property
    def num_parameters(self) -> int:
        """Number of scalars in floating-point tensors of the state dict."""
        return sum(t.numel() for t in self.state_dict.values() if t.is_floating_point())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe summary (tensor values are not included)."""
        return {
            "path": self.path,
            "format": self.format,
            "num_tensors": self.num_tensors,
            "num_parameters": self.num_parameters,
            "has_optimizer_state": self.optimizer_state is not None,
            "num_optimizers": len(self.optimizer_states),
            "metadata": to_jsonable(
                {k: v for k, v in self.metadata.items() if not isinstance(v, (torch.Tensor, Mapping))}
            ),
            "missing_keys": list(self.missing_keys),
            "unexpected_keys": list(self.unexpected_keys),
            "shape_mismatches": [[k, list(a), list(b)] for k, a, b in self.shape_mismatches],
            "perturbed": self.perturbed,
            "unperturbed": self.unperturbed,
            "prefix": self.prefix,
            "ignored_keys": list(self.ignored_keys),
        }

    def __repr__(self) -> str:
        d = self.to_dict()
        keys = ("path", "format", "num_tensors", "num_parameters", "perturbed", "unperturbed")
        extra = ", ".join(f"{k}={d[k]!r}" for k in keys)
        problems = len(self.missing_keys) + len(self.unexpected_keys) + len(self.shape_mismatches)
        return f"Checkpoint({extra}, key_problems={problems})"

    def _repr_html_(self) -> str:
        import html

        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(str(k))}</th>"
            f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>"
            for k, v in self.to_dict().items()
        )
        return f"<table><caption>Checkpoint</caption>{rows}</table>"


def short_list(items: list[str], limit: int = 8) -> str:
    """``items`` joined with commas, at most ``limit`` of them (then ``"... and N more"``)."""
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")

