"""analysis: the numerical engine.

Parameter vectors, data, Hessian operators with Lanczos eigenpairs, trace and spectral density,
landscape directions, sharpness metrics and the MSAM mechanism probes. May import :mod:`msam`;
never imports :mod:`landscape`.
"""

from .attention import second_order_attention
from .blocks import LayerSpectrum, PerLayerSpectrum, per_layer_spectrum
from .checks import check_first_batch, check_repeatable_forward
from .data import Batch, DataSource, as_data, batch_size_of, to_device
from .density import SpectralDensity, spectral_density
from .directions import (
    NORMALIZATIONS,
    PCADirections,
    as_direction,
    gradient_direction,
    interpolation_direction,
    momentum_direction,
    normalize_direction,
    orthogonalize,
    pca_directions,
    random_direction,
)
from .distributed import (
    DEFAULT_TIMEOUT,
    all_gather_object,
    all_reduce_gradients,
    all_reduce_sum,
    assert_same_across_ranks,
    barrier,
    broadcast_object,
    default_device,
    distributed_session,
    get_rank,
    get_world_size,
    init_from_env,
    is_distributed,
    is_main_process,
    launched_by_torchrun,
    shutdown,
)
from .evaluation import EvalResult, evaluate, forward, model_mode, resolve_loss
from .lanczos import (
    EigenResult,
    as_linear_operator,
    lanczos_tridiagonal,
    lanczos_tridiagonals,
    top_eigenpairs,
)
from .losses import CausalLMLoss, ModelLoss, OutputLoss, logits_of, loss_terms
from .operators import OPERATOR_KEYWORDS, AutoChoice, EmpiricalRisk, LinearOperator, TorchOperator
from .operators.curvature import (
    CurvatureOperator,
    GGNOperator,
    default_block_size,
    directional_curvature,
)
from .operators.empirical_risk import check_deterministic_setup
from .operators.hessian import HessianOperator
from .params import ParameterSpace, flatten, unflatten
from .probes import PROBES, FeatureRankResult, MechanismProbe, feature_rank, rank_for_variance
from .reference import dense_ggn, dense_hessian
from .results import COST_FIELDS, CostedResult, Result, to_jsonable
from .sharpness import METRICS as SHARPNESS_METRICS
from .sharpness import (
    DirectionalSharpnessResult,
    EpsilonSharpnessResult,
    PacBayesResult,
    SharpnessReport,
    SharpnessResult,
    directional_sharpness,
    epsilon_sharpness,
    loss_along_line,
    pac_bayes_flatness,
    preserved_state,
    sharpness,
    sharpness_report,
)
from .trace import TraceResult, hessian_trace
from .tracker import CurvatureTracker, TrackerHistory, TrackerRecord

__all__ = [
    # parameter vectors and data
    "ParameterSpace", "flatten", "unflatten",
    "Batch", "DataSource", "as_data", "batch_size_of", "to_device",
    "EvalResult", "evaluate", "forward", "model_mode", "resolve_loss",
    "Result", "to_jsonable",
    # curvature
    "CurvatureOperator", "HessianOperator", "GGNOperator", "directional_curvature",
    "EigenResult", "top_eigenpairs", "as_linear_operator", "lanczos_tridiagonal",
    "check_deterministic_setup", "TraceResult", "hessian_trace",
    "check_first_batch", "check_repeatable_forward",
    "SpectralDensity", "spectral_density", "dense_hessian", "dense_ggn",
    "LayerSpectrum", "PerLayerSpectrum", "per_layer_spectrum", "default_block_size",
    "lanczos_tridiagonals",
    "LinearOperator", "TorchOperator", "EmpiricalRisk", "AutoChoice", "OPERATOR_KEYWORDS",
    # directions
    "NORMALIZATIONS", "random_direction", "gradient_direction", "momentum_direction",
    "interpolation_direction", "pca_directions", "PCADirections", "orthogonalize",
    "normalize_direction", "as_direction",
    # sharpness
    "sharpness", "epsilon_sharpness", "pac_bayes_flatness", "directional_sharpness",
    "sharpness_report", "SharpnessResult", "EpsilonSharpnessResult", "PacBayesResult",
    "DirectionalSharpnessResult", "SharpnessReport", "SHARPNESS_METRICS", "preserved_state",
    "loss_along_line", "CostedResult", "COST_FIELDS",
    # probes
    "MechanismProbe", "PROBES", "feature_rank", "FeatureRankResult", "rank_for_variance",
    # distributed
    "init_from_env", "shutdown", "distributed_session", "is_distributed", "get_rank",
    "get_world_size", "is_main_process", "all_reduce_sum", "all_reduce_gradients", "barrier",
    "broadcast_object", "all_gather_object", "assert_same_across_ranks", "default_device",
    "launched_by_torchrun", "DEFAULT_TIMEOUT",
    # curvature during training
    "CurvatureTracker", "TrackerRecord", "TrackerHistory",
    # transformers and language models
    "second_order_attention", "CausalLMLoss", "ModelLoss", "OutputLoss", "logits_of", "loss_terms",
]
