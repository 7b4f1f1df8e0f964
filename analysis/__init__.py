"""analysis: the numerical engine (parameter vectors, data, Hessian operators, sharpness, probes).

May import :mod:`msam`; never imports :mod:`landscape`.
"""

from .data import Batch, DataSource, as_data, batch_size_of, to_device
from .evaluation import EvalResult, evaluate, forward, model_mode, resolve_loss
from .params import ParameterSpace, flatten, unflatten
from .results import Result, to_jsonable

__all__ = [
    # parameter vectors
    "ParameterSpace", "flatten", "unflatten",
    # data and evaluation
    "Batch", "DataSource", "as_data", "batch_size_of", "to_device",
    "EvalResult", "evaluate", "forward", "model_mode", "resolve_loss",
    # results
    "Result", "to_jsonable",
]
