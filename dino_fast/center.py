"""Teacher centering, one mechanism for the DINO and the iBOT losses: the EMA center (official
DINO, iBOT) or DINOv2's Sinkhorn-Knopp.

Center: ``center <- m * center + (1 - m) * mean of the teacher outputs``, the mean over every
rank's rows (one all-reduce of the column sums and the row count together: ranks may hold
different numbers of rows, iBOT's masked patches, or none). With gradient accumulation the
micro-batches' sums wait in :class:`Center` and :meth:`Center.flush_center` moves the center
once per optimizer step, from all of them.

Sinkhorn-Knopp (:func:`sinkhorn_knopp_teacher`): teacher probabilities from an equipartition of
the samples over the prototypes, computed over every rank's samples; no center is used.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["CENTERINGS", "Center", "all_reduce_", "sinkhorn_knopp_teacher"]

CENTERINGS = ("center", "sinkhorn_knopp")
"""The teacher centerings (config ``centering``): official EMA center | DINOv2 Sinkhorn-Knopp."""


def all_reduce_(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce over ranks, in place (a no-op on one process); returns ``t``."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


@torch.no_grad()
def sinkhorn_knopp_teacher(teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """DINOv2's Sinkhorn-Knopp teacher: (N, K) teacher outputs -> (N, K) fp32 probabilities, each
    row summing to 1, over the samples of every rank (N may differ between ranks, and be 0).

    Serves both of DINOv2's: ``SinkhornKnoppTeacher`` (DINO head: N = this rank's 2*B teacher
    rows) and ``iBOTPatchLoss.sinkhorn_knopp_teacher`` (N = this rank's masked patches). DINOv2:
    ``Q = exp(t / tau).T`` (K, N_all) scaled to total 1; ``n_iterations`` times each prototype
    row scaled to total 1/K (row sums all-reduced), then each sample column to 1/N_all; finally
    ``Q * N_all``, transposed back.

    The same values, computed safely: the divisions by the total, by K and by N_all are common
    factors that the next normalisation divides out exactly, so rows and columns are scaled to
    sum 1 instead (no sample count, which iBOT ranks would have to all-reduce). In the log
    domain, after each prototype's max over all ranks (a MAX all-reduce) is subtracted from the
    raw outputs, so the entries that carry the mass come from small, exact numbers: DINOv2's fp32
    ``exp(t / tau)`` overflows past t / tau = 88, and a sample far below every prototype's best
    underflows to a zero column (0/0). Collectives: one MAX and ``n_iterations`` SUMs of K values.
    """
    if teacher_output.dim() != 2 or not teacher_output.is_floating_point():
        raise ValueError(f"teacher_output must be a 2-D float tensor (N, K), got {teacher_output.dtype} "
                         f"{tuple(teacher_output.shape)}")
    if not teacher_temp > 0 or n_iterations < 1:
        raise ValueError(f"need teacher_temp > 0 and n_iterations >= 1, got {teacher_temp}, {n_iterations}")
    t = teacher_output.detach().float().t()  # (K, N)
    if t.shape[1]:
        row_max = t.amax(dim=1, keepdim=True)  # (K, 1)
    else:  # a rank without samples: every other rank's max wins
        row_max = t.new_full((t.shape[0], 1), float("-inf"))
    log_q = (t - all_reduce_(row_max, dist.ReduceOp.MAX)) / teacher_temp  # (K, N): log Q, each row's max 0
    for _ in range(n_iterations):
        # each prototype: total 1 over every rank's samples. No underflow: each row's max is 0 at
        # first, and after a column step >= -log(N_all * K) (a row summed to 1, a column to <= K)
        log_q = log_q - torch.log(all_reduce_(torch.exp(log_q).sum(dim=1, keepdim=True)))
        # each sample: total 1 (its column's max subtracted first: an outlier column stays exact)
        log_q = log_q - log_q.amax(dim=0, keepdim=True)
        log_q = log_q - torch.log(torch.exp(log_q).sum(dim=0, keepdim=True))
    return torch.exp(log_q).t()  # (N, K): each sample's assignment is a probability vector


class Center(nn.Module):
    """The teacher centering a loss owns: the ``center`` buffer (1, dim), its deferred EMA update,
    and the Sinkhorn-Knopp alternative. ``DINOLoss`` and ``iBOTPatchLoss`` are Centers, so the
    buffer stays ``center`` at the top of their state dicts (the official checkpoint's
    ``dino_loss`` entry holds ``{"center": (1, out_dim)}``).

    ``centering``: "center" (EMA of the teacher outputs' mean, ``momentum``) or "sinkhorn_knopp"
    (:func:`sinkhorn_knopp_teacher`, ``sinkhorn_iterations``; the buffer stays for state-dict
    compatibility and is neither used nor updated). A batch without rows on any rank leaves the
    center as it is.
    """

    def __init__(self, dim: int, momentum: float = 0.9, centering: str = "center", sinkhorn_iterations: int = 3):
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"the center needs dim >= 1, got {dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {momentum}")
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        if sinkhorn_iterations < 1:
            raise ValueError(f"sinkhorn_iterations must be >= 1, got {sinkhorn_iterations}")
        self.center_momentum = momentum
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, int(dim)))
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (column sums, rows), deferred

    @property
    def uses_center(self) -> bool:
        """True for the EMA center; False under Sinkhorn-Knopp."""
        return self.centering == "center"

    def sinkhorn(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """:func:`sinkhorn_knopp_teacher` with this part's number of iterations."""
        return sinkhorn_knopp_teacher(teacher_output, teacher_temp, self.sinkhorn_iterations)

    @torch.no_grad()
    def step_center(self, teacher_output: torch.Tensor, col_sum: torch.Tensor | None = None, *,
                    update_center: bool = True) -> None:
        """Feed one batch's teacher output (N, dim) to the center: one EMA step now, or with
        ``update_center=False`` its sums kept for :meth:`flush_center`. ``col_sum``: its fp32
        column sums when already computed (the fused kernels return them). Nothing under
        Sinkhorn-Knopp."""
        if not self.uses_center:
            return
        if col_sum is None:
            col_sum = torch.sum(teacher_output.detach(), dim=0, dtype=torch.float32)  # (dim,)
        # the count stays on the device: no host sync
        rows = torch.full((1,), teacher_output.shape[0], dtype=torch.float32, device=col_sum.device)
        if update_center:
            self._apply_center(col_sum, rows)
        elif self._pending is None:
            self._pending = (col_sum.clone(), rows)  # not the kernel's buffer itself
        else:
            self._pending = (self._pending[0] + col_sum, self._pending[1] + rows)

    @torch.no_grad()
    def flush_center(self) -> None:
        """Apply the center update of the batches deferred with ``update_center=False`` (one EMA step)."""
        if self._pending is not None:
            col_sum, rows = self._pending
            self._pending = None
            self._apply_center(col_sum, rows)

    @torch.no_grad()
    def _apply_center(self, col_sum: torch.Tensor, rows: torch.Tensor) -> None:
        # one collective for sums and count, into a new tensor (never the caller's or a kernel's)
        stats = all_reduce_(torch.cat([col_sum.float().reshape(-1), rows.reshape(1)]))
        total_rows = stats[-1]
        batch_center = (stats[:-1] / total_rows.clamp(min=1.0)).reshape(1, -1)
        m = self.center_momentum
        moved = self.center * m + batch_center * (1 - m)  # the official formula's products
        # in place (same storage for DDP buffer sync / CUDA graphs); no rows anywhere: unchanged
        self.center.copy_(torch.where(total_rows > 0, moved, self.center))
