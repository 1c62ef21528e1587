"""Routing statistics accumulated over a logging interval and all-reduced across ranks.

Shape legend: L MoE layers, E experts (the widest layer: after pruning, a layer's missing experts read 0).

Per layer and interval (sums over every forward of every rank, then normalised):

* ``routed_per_expert`` / ``tokens_per_expert``: assignments per expert before / after capacity
* ``dropped_frac`` / ``rerouted_frac``: of all routed assignments
* ``entropy``: mean routing entropy per token (nats)
* ``gate_mass``: per expert, the router's gate mass it received per token
* ``imbalance``: max / mean of ``tokens_per_expert``
* ``saliency``: per expert, mean over its computed assignments of gate * ||expert output|| (REAP-style)
"""

from __future__ import annotations

import torch

from moetrain.model.moe import MoEStats
from moetrain.runtime.distributed import all_reduce_sum

_SCALARS = 4  # entropy_sum, num_tokens, dropped, rerouted


class RoutingMetrics:
    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.E = num_experts
        self.sums_LX = torch.zeros(num_layers, 4 * num_experts + _SCALARS, dtype=torch.float64)

    def update(self, stats: list[MoEStats]) -> None:
        """Add one forward's statistics, on their device: no host sync until the interval's reduction."""
        for i, s in enumerate(stats):
            if self.sums_LX.device != s.routed_per_expert_E.device:
                self.sums_LX = self.sums_LX.to(s.routed_per_expert_E.device)
            scalars = [s.entropy_sum, s.num_tokens, s.dropped, s.rerouted]
            row = torch.cat(
                [
                    self._pad(s.routed_per_expert_E),
                    self._pad(s.tokens_per_expert_E),
                    self._pad(s.gate_mass_E),
                    self._pad(s.saliency_sum_E),
                    torch.stack([torch.as_tensor(x, device=self.sums_LX.device).double().reshape(()) for x in scalars]),
                ]
            )
            self.sums_LX[i] += row

    def _pad(self, v_E: torch.Tensor) -> torch.Tensor:
        """A pruned layer has fewer experts than the table's width: its columns past them stay zero."""
        v = v_E.detach().double()
        return torch.nn.functional.pad(v, (0, self.E - v.shape[0])) if v.shape[0] < self.E else v

    def reduce_and_reset_sums(self) -> torch.Tensor:
        """Collective: every rank must call it at the same step. Returns the summed (L, X) table, on the host."""
        sums = all_reduce_sum(self.sums_LX.to("cpu", copy=True))
        self.sums_LX.zero_()
        return sums

    def reduce_and_reset(self) -> dict[str, float | list[float]]:
        """Collective: every rank must call it at the same step. Returns the interval's metrics."""
        return metrics_from_sums(self.reduce_and_reset_sums(), self.E)

    def metrics(self, sums_LX: torch.Tensor) -> dict[str, float | list[float]]:
        """The metrics of a reduced table (:func:`metrics_from_sums`)."""
        return metrics_from_sums(sums_LX, self.E)


def metrics_from_sums(sums_LX: torch.Tensor, E: int) -> dict[str, float | list[float]]:
    out: dict[str, float | list[float]] = {}
    total_routed = total_dropped = total_rerouted = 0.0
    for i, row in enumerate(sums_LX):
        routed, computed, gate_mass, saliency = (row[j * E : (j + 1) * E] for j in range(4))
        entropy_sum, tokens, dropped, rerouted = row[4 * E :].tolist()
        n_routed = float(routed.sum())
        p = f"moe/layer{i}/"
        out[p + "routed_per_expert"] = routed.tolist()
        out[p + "tokens_per_expert"] = computed.tolist()
        out[p + "dropped_frac"] = dropped / max(n_routed, 1.0)
        out[p + "rerouted_frac"] = rerouted / max(n_routed, 1.0)
        out[p + "entropy"] = entropy_sum / max(tokens, 1.0)
        out[p + "gate_mass"] = (gate_mass / max(tokens, 1.0)).tolist()
        active = routed > 0
        out[p + "imbalance"] = float(computed.max() / computed[active].mean()) if active.any() else 0.0
        out[p + "saliency"] = (saliency / computed.clamp_min(1.0)).tolist()
        total_routed += n_routed
        total_dropped += dropped
        total_rerouted += rerouted
    out["moe/dropped_frac"] = total_dropped / max(total_routed, 1.0)
    out["moe/rerouted_frac"] = total_rerouted / max(total_routed, 1.0)
    return out
