"""msam: Momentum-SAM and related optimizers (torch.optim style). Imports torch only.

- :class:`MSAM`: Momentum-SAM on SGD with momentum (Becker et al. 2024, Algorithm 1), with the
  A.2 ablation ladder down to :class:`NAG` (Nesterov momentum, Sutskever's form).
- :class:`AdamWMSAM`: Momentum-SAM on AdamW.
- :class:`SAM`: SAM / ASAM wrapping any torch optimizer.
- :func:`recalibrate_batchnorm`, :func:`frozen_batchnorm_stats`: BatchNorm helpers.
- :func:`unperturbed_parameters`: weights saved at the perturbed point moved back to ``w``.
"""

from msam._perturbation import PerturbedOptimizer
from msam.adamw_msam import AdamWMSAM
from msam.batchnorm import frozen_batchnorm_stats, recalibrate_batchnorm
from msam.msam import MSAM, NAG
from msam.sam import SAM
from msam.saved_state import SavedStateError, unperturbed_parameters

__all__ = [
    # Momentum-SAM optimizers
    "MSAM",
    "NAG",
    "AdamWMSAM",
    "PerturbedOptimizer",
    # SAM / ASAM
    "SAM",
    # BatchNorm helpers
    "recalibrate_batchnorm",
    "frozen_batchnorm_stats",
    # saved-state format
    "unperturbed_parameters",
    "SavedStateError",
]
