"""Safe checkpoint loading: ``weights_only`` pickles and safetensors, key and shape reports, MSAM.

:func:`load_checkpoint`, :func:`find_checkpoints`, :class:`Checkpoint` and
:class:`CheckpointError` are imported from :mod:`landscape`; this package exports the rest
(the unsafe-file error, the perturbed-checkpoint warning, format sniffing, the suffixes).

:func:`load_checkpoint` reads

* torch files with ``torch.load(weights_only=True)``: a plain ``state_dict``, or a dictionary
  holding one under ``"model"``, ``"state_dict"`` or ``"model_state_dict"`` (training
  checkpoints such as ``{"model": ..., "optimizer": ..., "epoch": 3}`` and PyTorch Lightning
  ``.ckpt`` files, whose ``"optimizer_states"`` list is read too, every optimizer in it), with ``nn.DataParallel`` /
  DDP ``"module."`` and ``torch.compile`` ``"_orig_mod."`` prefixes removed (also nested), and a
  module-attribute prefix such as Lightning's ``"model."`` removed when it is the only prefix
  that makes the keys match the model (or when given as ``prefix=``);
* safetensors files;
* Hugging Face ``save_pretrained`` folders (``model.safetensors`` or ``pytorch_model.bin``,
  possibly sharded with their ``.index.json``); tied weights absent from the files (a language
  model head) are not reported missing; transformers' own key renaming is applied for a
  ``transformers`` model (a ViT saved by transformers 5 loads into the same class);
* Hugging Face Trainer ``checkpoint-N/`` folders, whose ``optimizer.pt`` is read too.

Every checkpoint, whatever its container, goes through one validation step before the model is
touched: every optimizer state in the file (a Lightning ``.ckpt`` may hold several), then the
tensors: integer data is never cast into floating-point parameters, non-finite values and the
meta device are refused, keys and shapes are matched (:mod:`.validation`, :mod:`.unperturb`).

Files are checked before anything parses them: a path that is not a regular file (a FIFO, a
device, a dangling symlink) is refused from ``os.stat`` alone, without opening it, so nothing can
block; the format is recognized by content, whatever the suffix (:func:`checkpoint_format`), so
an image, JSON or text file named ``.pt`` is reported as such; the CRC-32 of every member of a
torch zip is verified (``torch.load`` does not check them, so a flipped bit would load silently).

Security: a pickle that references anything beyond tensors and plain containers (a class, a
function such as ``os.system``) is refused with :class:`UnsafeCheckpointError` *before* any of it
runs; ``weights_only=True`` unpickling never calls the referenced object. Loading such files is
possible only with the explicit opt-in ``allow_pickle=True`` (CLI: ``--trust-pickle``), meant
for legacy files you created yourself; it is never the default.

MSAM checkpoints: between steps MSAM keeps the parameters at the perturbed point
``w~ = w - rho * v / ||v||`` (Becker et al. 2024, Algorithm 1). A checkpoint saved from there
(``torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()})`` without calling
``opt.eval()`` first) holds ``w~``, not the weights the optimizer is training. When the
checkpoint's optimizer state says it was saved perturbed, the loader **moves the weights back**
to ``w = w~ + rho * v / ||v||`` using the momentum buffers and ``rho`` stored in that same
optimizer state, and emits a :class:`PerturbedCheckpointWarning`; the returned
:class:`Checkpoint` records ``perturbed=True, unperturbed=True``. We correct rather than refuse
because the optimizer state holds everything the correction needs exactly (the same formula the
optimizer's own ``eval()`` applies), while refusing would leave the user with no way to evaluate
the file. If the state cannot be matched to the parameters (different counts or shapes), the
file is refused with an explanation instead; ``unperturb=False`` loads the raw perturbed weights.
Tied weights (an input embedding shared with a language-model head, saved under two keys) are
moved back under every key that names the same parameter (the same Parameter in ``model``;
without a model, the same saved tensor), so the twin loaded last cannot put ``w~`` back; tied
keys whose saved values differ are refused, naming both.
A malformed optimizer entry (``param_groups`` not a list, a ``perturbed`` flag that is a tensor,
a non-numeric ``perturbation_scale``) or non-finite move-back data (``perturbation_scale``,
``rho``, a momentum buffer) is refused with a :class:`CheckpointError` naming the file and the
key, before any weight is changed.
"""

from .finding import CHECKPOINT_SUFFIXES
from .reading import checkpoint_format
from .result import PerturbedCheckpointWarning, UnsafeCheckpointError

__all__ = ["UnsafeCheckpointError", "PerturbedCheckpointWarning", "checkpoint_format",
           "CHECKPOINT_SUFFIXES"]
