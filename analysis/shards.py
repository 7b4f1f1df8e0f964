"""Vectors sharded like FSDP2 parameters: their layout, global reductions and random draws.

A model sharded with ``torch.distributed.fsdp.fully_shard`` (FSDP2) holds every parameter as a
DTensor split on dim 0 over a 1-D device mesh of ``W`` ranks: rank ``r`` keeps rows
``[r c, min((r + 1) c, d_0))`` with ``c = ceil(d_0 / W)`` (``torch.chunk``; the last ranks may
hold fewer rows, or none). A *sharded vector* of the parameter space is the concatenation of
this rank's pieces, in ``named_parameters()`` order: its length is the local number of
parameter entries ``n_r`` (which may differ per rank, ``sum_r n_r = n``), and the global flat
vector of one process is the union of the pieces at their global offsets.

:class:`VectorShards` describes that layout (``segments``: the ``(global offset, length)`` of
every local piece) and is the one interface the Krylov code needs to work on sharded vectors
(:attr:`analysis.operators.ShardedHessianOperator.shards`; an operator without the attribute,
or with ``None``, has replicated vectors):

* :meth:`VectorShards.sum`: a float or a float64 tensor summed over the ranks (one
  all-reduce): every dot product and norm is ``sum_r (local part)``, equal on every rank;
* :meth:`VectorShards.randn` / :meth:`VectorShards.randint`: the local slice of the vector a
  single process draws with the same generator (``torch.randn(n)``, ``torch.randint(0, 2,
  (k, n))``), drawn in chunks of :data:`DRAW_CHUNK` entries, so no rank holds a full vector
  (each rank runs the generator over all ``n`` entries: ``O(n)`` time, ``O(chunk)`` memory);
* :meth:`VectorShards.orthonormal`: the Q factor of a tall matrix whose rows are sharded
  (TSQR: a local QR, the ``k x k`` R factors all-gathered and factored again);
* :meth:`VectorShards.largest_entry_sign`, :meth:`VectorShards.full`: the sign convention of
  eigenvectors and the all-gathered full vector (for checks and exports).

Memory per rank: a Krylov basis of ``m`` vectors holds ``m n_r`` numbers instead of ``m n``
(``n_r ~ n / W``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as _dist
from torch import nn

__all__ = ["VectorShards", "has_dtensor_parameters", "is_dtensor", "DRAW_CHUNK"]

#: Entries per chunk of the random draws (a multiple of 16: ``torch.randn`` on the CPU fills
#: blocks of 16, so chunks of this size, the last one of at least 16 entries, give the same
#: numbers as one draw).
DRAW_CHUNK = 1 << 16


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter)."""
    return hasattr(t, "to_local") and hasattr(t, "placements")


def has_dtensor_parameters(model: Any) -> bool:
    """Whether ``model`` is an ``nn.Module`` with a DTensor parameter (FSDP2 ``fully_shard``)."""
    if not isinstance(model, nn.Module):
        return False
    return any(is_dtensor(p) for p in model.parameters())


def _draw_chunks(total: int) -> Iterable[tuple[int, int]]:
    """``[start, stop)`` chunks of ``total`` entries: :data:`DRAW_CHUNK` each, the last one
    merged with the previous when it would hold fewer than 16 entries."""
    start = 0
    while start < total:
        stop = min(start + DRAW_CHUNK, total)
        if total - stop < 16:
            stop = total
        yield start, stop
        start = stop


@dataclass(frozen=True)
class VectorShards:
    """The layout of a vector sharded over ranks, with its global reductions (module docstring).

    Attributes:
        segments: ``(global offset, length)`` of every local piece, in local order (ascending
            global offsets).
        global_numel: ``n``, the length of the global vector.
        group: the process group the pieces are spread over (``None``: the default group).
        device: where collectives run (the parameters' device: CUDA for NCCL, CPU for gloo).
    """

    segments: tuple[tuple[int, int], ...]
    global_numel: int
    group: Any = None
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        starts, end = [0], 0
        for off, length in self.segments:
            if length < 0 or off < end or off + length > self.global_numel:
                raise ValueError(f"segment ({off}, {length}) is out of order or outside "
                                 f"[0, {self.global_numel})")
            end = off + length
            starts.append(starts[-1] + length)
        object.__setattr__(self, "_starts", starts)

    # -- the layout ---------------------------------------------------------------------------
    @property
    def local_numel(self) -> int:
        """``n_r``, the length of this rank's vectors."""
        return self._starts[-1]

    @property
    def world_size(self) -> int:
        """Ranks in :attr:`group` (1 without a process group)."""
        if not (_dist.is_available() and _dist.is_initialized()):
            return 1
        return _dist.get_world_size(self.group)

    @classmethod
    def from_parameters(cls, params: Sequence[tuple[str, torch.Tensor]]) -> VectorShards:
        """The layout of the flat vector over ``params`` (``(name, DTensor)`` pairs, FSDP2:
        ``Shard(0)`` on one 1-D mesh).

        Raises:
            ValueError: a parameter that is not a DTensor, is placed otherwise than
                ``Shard(0)`` on a 1-D mesh, lives on another mesh than the first, or whose
                local rows are not the ``torch.chunk`` rows of this rank.
        """
        from torch.distributed.tensor import DTensor, Shard

        segments, offset, mesh = [], 0, None
        for name, p in params:
            if not isinstance(p, DTensor):
                raise ValueError(f"parameter {name!r} is not sharded (a {type(p).__name__}, "
                                 "not a DTensor): apply fully_shard to the root module too, so "
                                 "that every parameter is sharded")
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise ValueError(f"parameter {name!r} is placed {tuple(p.placements)} on a "
                                 f"{p.device_mesh.ndim}-D mesh; sharded analysis supports "
                                 "FSDP2's Shard(0) on a 1-D mesh")
            mesh = p.device_mesh if mesh is None else mesh
            if p.device_mesh != mesh:
                raise ValueError(f"parameter {name!r} lives on another device mesh than the "
                                 "first parameter")
            local = p.to_local()
            rows = p.shape[0] if p.dim() else 1
            world, rank = mesh.size(), mesh.get_local_rank()
            per = -(-rows // world)
            first = min(rank * per, rows)
            want = max(0, min(per, rows - first))
            if (local.shape[0] if local.dim() else 1) != want or local.numel() != \
                    want * (p.numel() // max(rows, 1)):
                raise ValueError(f"parameter {name!r}: rank {rank} holds local shape "
                                 f"{tuple(local.shape)}, expected {want} of its {rows} rows "
                                 "(torch.chunk over the mesh)")
            row_numel = p.numel() // max(rows, 1)
            if local.numel():
                segments.append((offset + first * row_numel, local.numel()))
            offset += p.numel()
        if mesh is None:
            raise ValueError("the model has no trainable parameters")
        device = torch.device(mesh.device_type, torch.cuda.current_device()) \
            if mesh.device_type == "cuda" else torch.device(mesh.device_type)
        return cls(tuple(segments), offset, mesh.get_group(0), device)

    # -- reductions ---------------------------------------------------------------------------
    def sum(self, x: float | torch.Tensor) -> Any:
        """``x`` summed over the ranks (a float, or a tensor returned in its device and dtype;
        the sum is taken in float64 on :attr:`device`, one all-reduce). Identity on one rank."""
        if self.world_size == 1:
            return x
        if isinstance(x, torch.Tensor):
            t = x.detach().to(device=self.device, dtype=torch.float64).clone()
            _dist.all_reduce(t, op=_dist.ReduceOp.SUM, group=self.group)
            return t.to(device=x.device, dtype=x.dtype)
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
        _dist.all_reduce(t, op=_dist.ReduceOp.SUM, group=self.group)
        return float(t.item())

    def norms(self, Y: torch.Tensor) -> torch.Tensor:
        """The global norms of the columns of a sharded ``(n_r, k)`` block (float64, CPU)."""
        local = Y.double().pow(2).sum(0).cpu() if Y.numel() else torch.zeros(Y.shape[1],
                                                                              dtype=torch.float64)
        return self.sum(local).sqrt()

    def _gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (one shape on all ranks), in rank order."""
        if self.world_size == 1:
            return [t]
        src = t.to(self.device).contiguous()
        out = [torch.empty_like(src) for _ in range(self.world_size)]
        _dist.all_gather(out, src, group=self.group)
        return [o.to(t.device) for o in out]

    # -- random draws -------------------------------------------------------------------------
    def _stream(self, total: int, rows: int, draw: Callable[[int], torch.Tensor],
                out: torch.Tensor) -> torch.Tensor:
        """Run ``draw`` over ``rows * total`` entries in chunks, keeping this rank's pieces of
        every row in ``out`` (``(rows, n_r)``)."""
        pieces = [(r * total + off, r, s, length) for r in range(rows)
                  for (off, length), s in zip(self.segments, self._starts)]
        i = 0
        for c0, c1 in _draw_chunks(rows * total):
            chunk = draw(c1 - c0)
            while i < len(pieces) and pieces[i][0] + pieces[i][3] <= c0:
                i += 1
            j = i
            while j < len(pieces) and pieces[j][0] < c1:
                g0, r, s, length = pieces[j]
                a, b = max(g0, c0), min(g0 + length, c1)
                out[r, s + a - g0:s + b - g0] = chunk[a - c0:b - c0]
                j += 1
        return out

    def randn(self, generator: torch.Generator) -> torch.Tensor:
        """This rank's slice of ``torch.randn(n, generator=generator, dtype=torch.float64)``
        (float64, CPU; the generator advances as for that draw)."""
        out = torch.empty(1, self.local_numel, dtype=torch.float64)
        return self._stream(self.global_numel, 1, lambda c: torch.randn(
            c, generator=generator, dtype=torch.float64), out)[0]

    def randint(self, rows: int, generator: torch.Generator) -> torch.Tensor:
        """This rank's columns of ``torch.randint(0, 2, (rows, n), generator=generator)``
        (int8, CPU): the signs of Rademacher vectors, as one process draws them."""
        out = torch.empty(rows, self.local_numel, dtype=torch.int8)
        return self._stream(self.global_numel, rows, lambda c: torch.randint(
            0, 2, (c,), generator=generator, dtype=torch.int8), out)

    # -- factorizations and conventions -------------------------------------------------------
    def orthonormal(self, Y: torch.Tensor) -> torch.Tensor:
        """The thin Q factor of the global ``(n, k)`` matrix whose rows ``Y`` (``(n_r, k)``)
        holds, as this rank's rows (TSQR, Demmel et al. 2012: ``Y_r = Q_r R_r`` locally, the
        stacked ``R_r`` (``W k x k``, all-gathered) factored as ``Q' R``, then ``Q = diag(Q_r)
        Q'``; as stable as one Householder QR). Needs ``k <= n``. Half precision is factored
        in float32."""
        work = Y.float() if Y.dtype in (torch.float16, torch.bfloat16) else Y
        k = work.shape[1]
        q_local, r_local = torch.linalg.qr(work)
        r_pad = torch.zeros(k, k, dtype=work.dtype, device=work.device)
        r_pad[:r_local.shape[0]] = r_local
        stacked = torch.cat(self._gather(r_pad), 0)
        q_small, _ = torch.linalg.qr(stacked)
        rank = _dist.get_rank(self.group) if self.world_size > 1 else 0
        mine = q_small[rank * k:rank * k + r_local.shape[0]]
        return (q_local @ mine).to(Y.dtype)

    def largest_entry_sign(self, v: torch.Tensor) -> float:
        """The sign (+1 or -1) of the global entry of largest magnitude of ``v`` (the first
        such entry, as ``torch.argmax`` of the full vector picks), equal on every rank."""
        if v.numel():
            i = int(v.abs().argmax())
            seg = bisect.bisect_right(self._starts, i) - 1
            g = self.segments[seg][0] + i - self._starts[seg]
            mine = torch.tensor([float(v[i].abs()), -float(g), 1.0 if v[i] >= 0 else -1.0],
                                dtype=torch.float64)
        else:
            mine = torch.tensor([-1.0, -math.inf, 1.0], dtype=torch.float64)
        best = max(self._gather(mine), key=lambda t: (float(t[0]), float(t[1])))
        return float(best[2])

    def full(self, v: torch.Tensor) -> torch.Tensor:
        """The global vector of the sharded ``v`` on every rank (``n`` entries: for checks and
        exports of small vectors, not for the algorithms)."""
        out = torch.zeros(self.global_numel, dtype=v.dtype, device=v.device)
        for (off, length), s in zip(self.segments, self._starts):
            out[off:off + length] = v[s:s + length]
        return self.sum(out)
