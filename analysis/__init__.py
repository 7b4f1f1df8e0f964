"""analysis: the numerical engine.

Parameter vectors, data, Hessian operators with Lanczos eigenpairs, trace and spectral density,
landscape directions, sharpness metrics and the MSAM mechanism probes. May import :mod:`msam`;
never imports :mod:`landscape`.

What users call is importable from ``analysis`` (the list below); the rest has one home each:
:mod:`analysis.data` (data sources), :mod:`analysis.losses` (loss protocols, loss terms),
:mod:`analysis.operators` (the operator machinery), :mod:`analysis.krylov` (Lanczos
tridiagonals), :mod:`analysis.directions` (normalization, Gram-Schmidt), :mod:`analysis.sharpness`
(the metric table, APGD checkpoints), :mod:`analysis.checks`, :mod:`analysis.results`,
:mod:`analysis.reference` (dense float64 references), :mod:`analysis.probes`,
:mod:`analysis.distributed` (process-group helpers).
"""

from .attention import second_order_attention
from .blocks import LayerSpectrum, PerLayerSpectrum, per_layer_spectrum
from .data import Data
from .density import SpectralDensity, spectral_density
from .directions import (
    gradient_direction,
    interpolation_direction,
    momentum_direction,
    random_direction,
)
from .evaluation import EvalResult, evaluate
from .lanczos import EigenResult, top_eigenpairs
from .losses import CausalLMLoss, LossSpec
from .operators.adapters import as_linear_operator
from .operators.curvature import GGNOperator, directional_curvature
from .operators.hessian import HessianOperator
from .operators.protocol import LinearOperator
from .params import ParameterSpace, flatten, unflatten
from .pca import PCADirections, pca_directions
from .probes import FeatureRankResult, MechanismProbe, feature_rank
from .sharpness.directional import DirectionalSharpnessResult, directional_sharpness
from .sharpness.epsilon import EpsilonSharpnessResult, epsilon_sharpness
from .sharpness.m_sharpness import SharpnessResult, sharpness
from .sharpness.pac_bayes import PacBayesResult, pac_bayes_flatness
from .sharpness.report import SharpnessReport, sharpness_report
from .trace import TraceResult, hessian_trace
from .tracker import CurvatureTracker, TrackerHistory, TrackerRecord

__all__ = [
    # parameter vectors, data, losses, evaluation
    "ParameterSpace", "flatten", "unflatten", "Data", "LossSpec", "CausalLMLoss", "evaluate",
    "EvalResult",
    # curvature operators
    "HessianOperator", "GGNOperator", "LinearOperator", "as_linear_operator",
    "directional_curvature",
    # spectra
    "top_eigenpairs", "EigenResult", "hessian_trace", "TraceResult", "spectral_density",
    "SpectralDensity", "per_layer_spectrum", "PerLayerSpectrum", "LayerSpectrum",
    # directions
    "random_direction", "gradient_direction", "momentum_direction", "interpolation_direction",
    "pca_directions", "PCADirections",
    # sharpness
    "sharpness", "epsilon_sharpness", "pac_bayes_flatness", "directional_sharpness",
    "sharpness_report", "SharpnessResult", "EpsilonSharpnessResult", "PacBayesResult",
    "DirectionalSharpnessResult", "SharpnessReport",
    # curvature and mechanism during training
    "CurvatureTracker", "TrackerRecord", "TrackerHistory", "MechanismProbe", "feature_rank",
    "FeatureRankResult",
    # transformers
    "second_order_attention",
]
