"""Sharpness metrics: worst-case and average (adaptive, m-) sharpness, Keskar's epsilon-sharpness,
PAC-Bayes flatness, directional sharpness, and a report computing a chosen set in one call.

Definitions (``L_B`` the batch-mean loss, ``c = |w|`` for adaptive metrics, ``c = 1`` otherwise):

* worst-case m-sharpness (Andriushchenko et al. 2023, "A Modern Look at the Relationship between
  Sharpness and Generalization"; adaptive: Kwon et al. 2021, ASAM)::

      S_max = mean_B [ max_{||delta / c||_p <= rho} L_B(w + delta) - L_B(w) ]

  every batch ``B`` of ``m`` samples is maximized on its own by APGD (Croce & Hein 2020):
  ``steps`` iterations of projected ascent in the normalized coordinates ``u = delta / c``
  (step ``2 rho``, momentum 0.75, step halving at the checkpoints
  ``0, 0.22, 0.41, 0.57, ... * steps`` when too few steps improved or the best value stalled).
* average sharpness: ``S_avg = mean_B E_{delta ~ N(0, rho^2 diag(c^2))}[L_B(w + delta) - L_B(w)]``.
  ``mean_B`` weights each batch by its loss terms (samples, or the counted tokens of a
  language-model loss), like the full-data loss.
* epsilon-sharpness (Keskar et al. 2017): ``100 * (max_{|z_i| <= eps (|w_i| + 1)} L(w + z) - L(w))
  / (1 + L(w))`` on the whole data, maximized by L-BFGS-B (as Keskar et al.) or APGD.
* PAC-Bayes flatness (Jiang et al. 2020, "Fantastic Generalization Measures"): ``1 / sigma'^2``
  with ``sigma'`` the largest noise scale such that ``w + u``, ``u ~ N(0, sigma^2 I)`` (plain) or
  ``u_i ~ N(0, sigma^2 w_i^2 + 1e-6)`` (magnitude-aware), lowers the training accuracy by
  ``target`` (0.1) on average; found by bisection with common random numbers.
* directional sharpness (MSAM paper, Fig. 4): ``L(w + r d / ||d||) - L(w)`` for each radius ``r``.

Every function leaves the model exactly as it found it (parameters, buffers such as BatchNorm
running statistics, ``.grad``, ``requires_grad`` and train/eval flags, bit for bit, also on
error) and never touches the global random number generator. Every result records the number
of forward and backward passes (batch-level calls, and the samples they covered) it used.

Modules: :mod:`.apgd` (the ascent), :mod:`.m_sharpness` (worst-case and average),
:mod:`.epsilon`, :mod:`.pac_bayes`, :mod:`.directional`, :mod:`.report`; :mod:`.state`
(``preserved_state``) and ``_common`` (argument checks, pass counting, the full-data loss) are
shared by all of them.

The metrics and their result types are imported from :mod:`analysis` (``from analysis import
sharpness``); this package exports the metric table of :func:`~analysis.sharpness_report`
(``METRICS``), the APGD step-size checkpoints, ``loss_along_line`` and ``preserved_state``.
"""

from __future__ import annotations

from .apgd import apgd_checkpoints
from .directional import loss_along_line
from .report import METRICS
from .state import preserved_state

__all__ = ["METRICS", "apgd_checkpoints", "loss_along_line", "preserved_state"]
