"""Expert parallelism: ship assignments to the rank that owns their expert, compute, ship results back.

Shape legend: S local assignments sorted by global expert, R assignments received by this rank, D model
dim, E experts, El = E / ep local experts, P = ep ranks in the group, C chunks.

Rank p of an expert-parallel group owns experts ``p*El .. (p+1)*El - 1``. Counts are exchanged first (one
small all-to-all), then assignments with ``all_to_all_single`` and uneven splits. With ``chunks > 1`` each
destination's rows are cut into C contiguous pieces; chunk c+1's dispatch all-to-all runs asynchronously
while chunk c's experts compute, and chunk c's return all-to-all runs while chunk c+1 computes. The
backward pass runs the transposed all-to-alls synchronously.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moetrain.model.experts import GroupedExperts


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; optionally asynchronous in forward (the caller waits on the
    handle appended to ``handles`` before reading the output). Backward sends gradients the other way."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group, handles: list | None):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        work = dist.all_to_all_single(
            out, x.contiguous(), out_splits, in_splits, group=group, async_op=handles is not None
        )
        if handles is not None:
            handles.append(work)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(in_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, handles: list | None = None):
    return _AllToAll.apply(x, out_splits, in_splits, group, handles)


def _chunk_rows(send_counts_PEl: torch.Tensor, chunks: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Row indices of each chunk (destination-major inside a chunk) and per-chunk expert counts (P, C, El)."""
    P, El = send_counts_PEl.shape
    rows_P = send_counts_PEl.sum(1)
    starts_P = torch.cumsum(rows_P, 0) - rows_P
    local_expert_S = torch.repeat_interleave(torch.arange(El).repeat(P), send_counts_PEl.reshape(-1))
    chunk_rows, counts = [], torch.zeros(P, chunks, El, dtype=torch.long)
    bounds_PC = [[int(starts_P[p] + (rows_P[p] * c) // chunks) for c in range(chunks + 1)] for p in range(P)]
    for c in range(chunks):
        pieces = [torch.arange(bounds_PC[p][c], bounds_PC[p][c + 1]) for p in range(P)]
        for p, piece in enumerate(pieces):
            counts[p, c] = torch.bincount(local_expert_S[piece], minlength=El)
        chunk_rows.append(torch.cat(pieces))
    return chunk_rows, counts


def _source_to_expert_order(recv_counts_PEl: torch.Tensor) -> torch.Tensor:
    """Permutation that turns rows ordered (source rank, local expert) into (local expert, source rank)."""
    P, El = recv_counts_PEl.shape
    row_block = torch.repeat_interleave(torch.arange(P * El), recv_counts_PEl.reshape(-1))  # block id s*El+e
    expert_major_key = (row_block % El) * P + row_block // El
    return torch.sort(expert_major_key, stable=True).indices


def expert_parallel_ffn(
    x_SD: torch.Tensor, tokens_per_expert_E: torch.Tensor, experts: GroupedExperts, group, chunks: int = 1
) -> torch.Tensor:
    """Expert outputs for this rank's sorted assignments, computed by the ranks that own the experts."""
    P = dist.get_world_size(group)
    El = tokens_per_expert_E.numel() // P
    send_counts_PEl = tokens_per_expert_E.view(P, El).cpu()
    chunk_rows, send_PCEl = _chunk_rows(send_counts_PEl, chunks)
    recv_PCEl = torch.empty_like(send_PCEl)
    dist.all_to_all_single(recv_PCEl, send_PCEl, group=group)

    device = x_SD.device
    pending_dispatch: list = []
    received: list[torch.Tensor] = []
    combine_handles: list = []
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def start_dispatch(c: int) -> None:
        in_splits = send_PCEl[:, c].sum(1).tolist()
        out_splits = recv_PCEl[:, c].sum(1).tolist()
        received.append(all_to_all(x_SD[chunk_rows[c].to(device)], out_splits, in_splits, group, pending_dispatch))

    start_dispatch(0)
    for c in range(chunks):
        pending_dispatch[c].wait()
        if c + 1 < chunks:
            start_dispatch(c + 1)  # overlaps with this chunk's expert compute
        recv_counts_PEl = recv_PCEl[:, c]
        order_R = _source_to_expert_order(recv_counts_PEl).to(device)
        y_sorted = experts(received[c][order_R], recv_counts_PEl.sum(0).to(device))
        y_R = torch.empty_like(y_sorted).index_copy(0, order_R, y_sorted)  # back to (source, expert) order
        back = all_to_all(y_R, send_PCEl[:, c].sum(1).tolist(), recv_PCEl[:, c].sum(1).tolist(), group, combine_handles)
        outputs.append((chunk_rows[c].to(device), back))
    for work in combine_handles:
        work.wait()
    rows = torch.cat([r for r, _ in outputs])
    backs = torch.cat([b for _, b in outputs])
    return x_SD.new_zeros(x_SD.shape[0], backs.shape[1]).index_copy(0, rows, backs)
