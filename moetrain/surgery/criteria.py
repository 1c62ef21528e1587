"""Expert-pruning criteria: per MoE layer, a score per expert from the routing profile of calibration tokens
(higher: more worth keeping). Each is a pure function of the layer's sums over the profiled tokens; the
pruner turns scores into shares of the layer (:func:`shares`) and cuts the smallest.

Shape legend: E experts of a layer. Notation: over the calibration tokens x, expert j is routed the tokens
R_j (the top-k choices, no capacity limit while profiling), with gate g_j(x) (the family's own gate: after
its renormalisation and routed scaling) and output f_j(x).
"""

from __future__ import annotations

import torch

from moetrain.config.choices import PruneCriterion


def frequency(routed_E: torch.Tensor) -> torch.Tensor:
    """``|R_j|``: how many assignments the router gave expert j (its routed-token share once normalised).
    The baseline of the MoE pruning papers (e.g. "frequency" in REAP, Lasby et al. 2025)."""
    return routed_E.double()


def gate_mass(gate_mass_E: torch.Tensor) -> torch.Tensor:
    """``sum_{x in R_j} g_j(x)``: the router's total gate weight on expert j."""
    return gate_mass_E.double()


def reap(saliency_sum_E: torch.Tensor, routed_E: torch.Tensor) -> torch.Tensor:
    """``(1 / |R_j|) sum_{x in R_j} g_j(x) * ||f_j(x)||_2``: REAP's router-weighted expert activation (Lasby et
    al., "REAP: Router-weighted Expert Activation Pruning", Cerebras 2025); 0 for an expert routed nothing."""
    return saliency_sum_E.double() / routed_E.double().clamp_min(1.0)


def ean(output_norm_sum_E: torch.Tensor, routed_E: torch.Tensor) -> torch.Tensor:
    """``(1 / |R_j|) sum_{x in R_j} ||f_j(x)||_2``: the gate-free mean expert activation norm over routed tokens
    (EAN, the ablation of REAP without the gate); 0 for an expert routed nothing."""
    return output_norm_sum_E.double() / routed_E.double().clamp_min(1.0)


def random_scores(num_experts: int, seed: int, layer: int) -> torch.Tensor:
    """A seeded uniform score per expert: the chance baseline (the same for the same seed and layer)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.rand(num_experts, generator=gen, dtype=torch.float64)


def scores(
    criterion: PruneCriterion | str,
    routed_E: torch.Tensor,
    gate_mass_E: torch.Tensor,
    saliency_sum_E: torch.Tensor,
    output_norm_sum_E: torch.Tensor,
    seed: int = 0,
    layer: int = 0,
) -> torch.Tensor:
    """The score of every expert of one layer under ``criterion`` (a ``prune.criterion`` value or alias)."""
    name = str(criterion)
    criterion = PruneCriterion[name] if name in PruneCriterion.__members__ else PruneCriterion(name)
    if criterion is PruneCriterion.frequency:
        return frequency(routed_E)
    if criterion is PruneCriterion.gate_mass:
        return gate_mass(gate_mass_E)
    if criterion is PruneCriterion.reap:
        return reap(saliency_sum_E, routed_E)
    if criterion is PruneCriterion.ean:
        return ean(output_norm_sum_E, routed_E)
    if criterion is PruneCriterion.random:
        return random_scores(routed_E.numel(), seed, layer)
    raise ValueError(f"prune.criterion={name} is not computed from a routing profile (surgery/reconstruction.py)")


def shares(scores_E: torch.Tensor) -> torch.Tensor:
    """Scores as shares of the layer (they sum to 1): what ``prune.threshold`` is compared with."""
    return scores_E / scores_E.sum().clamp_min(1e-30)
