"""Staged expert pruning from utilization profiles: profile -> rank -> remove -> validate -> keep or roll back.

Shape legend: L MoE layers, E experts of a layer.

A stage with ``prune: true`` starts with one round (:class:`PruneHook`):

1. validation loss ``v0``; a snapshot checkpoint of the current state (the rollback point);
2. profile ``prune.profile_tokens`` tokens of training data (a fixed sample: the same for every round and
   independent of the data position, so resume is exact) in eval mode without capacity limits, summed over
   every data- and expert-parallel rank;
3. per layer, each expert's *share* of the criterion (shares sum to 1 per layer): ``frequency`` = its fraction
   of the routed assignments, ``gate_mass`` = its fraction of the gate mass, ``reap`` = REAP's mean over its
   routed tokens of ``gate * ||expert output||``, ``ean`` = the same without the gate, ``random`` = a seeded
   baseline, normalised over the layer (formulas and sources in :mod:`moetrain.surgery.criteria`);
4. cold experts (share < ``prune.threshold``) are removed, coldest first, at most ``prune.max_fraction`` of
   a layer's experts (``ranking: global``: of all experts, ranked together), never below ``prune.min_experts``;
   then the removal count of each layer is rounded *down* until the survivors divide ``parallel.ep_size``
   (a layer keeps an expert rather than break the even layout); with ``prune.equal_per_layer`` every layer
   then removes only as many as the layer that removes the fewest (one expert count, as HF configs need);
5. physical removal (:mod:`moetrain.surgery.experts`), optimizer moments of survivors carried into the
   rebuilt engine; validation loss ``v1`` right after the cut (before any recovery training): if
   ``v1 - v0 > prune.max_loss_increase`` the snapshot is restored (structure, weights, optimizer, RNG) and
   the round is recorded as rolled back.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from typing import Any

import torch

from moetrain.config import PruneConfig, PruneCriterion, PruneMode, StageConfig
from moetrain.runtime.distributed import all_reduce_sum, barrier
from moetrain.surgery import criteria
from moetrain.surgery.experts import expert_pieces
from moetrain.surgery.merging import merge_groups
from moetrain.surgery.ops import StructureOps
from moetrain.surgery.reconstruction import removal_scores
from moetrain.train.checkpoint import fault_requested
from moetrain.train.stages import StageState

log = logging.getLogger("moetrain")


@dataclass
class ExpertProfile:
    """Sums over the profiled tokens of every rank, one entry per MoE layer."""

    routed_E: list[torch.Tensor]  # assignments the router chose
    gate_mass_E: list[torch.Tensor]  # router gate mass per expert
    saliency_sum_E: list[torch.Tensor]  # sum over routed assignments of gate * ||expert output||
    tokens: int
    output_norm_sum_E: list[torch.Tensor] | None = None  # sum over routed assignments of ||expert output||

    def shares(self, criterion: str, seed: int = 0) -> list[torch.Tensor]:
        """Each expert's share of its layer's criterion total (sums to 1 per layer; moetrain/surgery/criteria.py)."""
        if self.output_norm_sum_E is None and str(criterion) == "ean":
            # zeros would make every expert tie: say what is missing instead
            raise ValueError("prune.criterion=ean needs the profile's output-norm sums (output_norm_sum_E)")
        norms = self.output_norm_sum_E or [torch.zeros_like(r) for r in self.routed_E]  # read by ean only
        layers = zip(self.routed_E, self.gate_mass_E, self.saliency_sum_E, norms)
        return [
            criteria.shares(criteria.scores(criterion, routed, mass, sal, norm, seed=seed, layer=j))
            for j, (routed, mass, sal, norm) in enumerate(layers)
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "routed": [t.tolist() for t in self.routed_E],
            "gate_mass": [t.tolist() for t in self.gate_mass_E],
            "saliency_sum": [t.tolist() for t in self.saliency_sum_E],
            "output_norm_sum": [t.tolist() for t in self.output_norm_sum_E or []],
        }


@torch.no_grad()
def profile_experts(forward, moe_layers, batches) -> ExpertProfile:
    """Collective. Run ``batches`` through ``forward`` (the model in eval mode) with no capacity limit and sum
    each layer's routing statistics over every rank."""
    saved = [layer.eval_capacity_factor for layer in moe_layers]
    sizes = [layer.num_experts for layer in moe_layers]
    sums = torch.zeros(sum(4 * e for e in sizes) + 1, dtype=torch.float64)
    try:
        for layer in moe_layers:
            layer.eval_capacity_factor = None  # every routed assignment is computed: saliency sees them all
        for inputs, _ in batches:
            out = forward(inputs)
            parts = []
            for s in out.moe_stats:
                parts += [s.routed_per_expert_E, s.gate_mass_E, s.saliency_sum_E, s.output_norm_sum_E]
            sums += torch.cat([p.detach().double().cpu() for p in parts] + [torch.tensor([inputs.numel()]).double()])
    finally:
        for layer, cf in zip(moe_layers, saved):
            layer.eval_capacity_factor = cf
    sums = all_reduce_sum(sums)
    chunks, off = [], 0
    for e in sizes:
        chunks.append([sums[off + i * e : off + (i + 1) * e].clone() for i in range(4)])
        off += 4 * e
    routed, mass, saliency, norms = [list(x) for x in zip(*chunks)] if chunks else ([], [], [], [])
    return ExpertProfile(routed, mass, saliency, tokens=int(sums[-1]), output_norm_sum_E=norms)


def _removals(
    candidates: list[tuple[float, int, int]],
    sizes: list[int],
    fraction: float,
    min_experts: int,
    ranked_globally: bool,
    caps: list[int] | None = None,
    budget: int | None = None,
) -> list[list[int]]:
    """Per layer, the ``candidates`` ``(share, layer, expert)`` removed, coldest first: at most ``caps[layer]``
    of a layer (default ``floor(fraction * experts)``), or, ranked globally, ``budget`` (default
    ``floor(fraction * all experts)``) anywhere; never below ``min_experts`` in a layer."""
    removed: list[list[int]] = [[] for _ in sizes]
    if ranked_globally and caps is None:
        budget = math.floor(fraction * sum(sizes)) if budget is None else budget
        for _, layer, e in candidates:
            if budget > 0 and sizes[layer] - len(removed[layer]) - 1 >= min_experts:
                removed[layer].append(e)
                budget -= 1
        return removed
    if caps is None:
        caps = [min(math.floor(fraction * n), n - min_experts) for n in sizes]
    for _, layer, e in candidates:
        if len(removed[layer]) < caps[layer]:
            removed[layer].append(e)
    return removed


def select_survivors(
    shares: list[torch.Tensor], cfg: PruneConfig, ep_size: int, round_index: int = 0, top_k: int = 1
) -> list[list[int]]:
    """Per layer, the experts (current indices, ascending) that survive round ``round_index`` (0-based): the
    budget's cut where one is set (down to ``keep[round_index]`` experts, past the last entry the last; or
    ``remove_fraction`` of them), else the threshold's (cold experts, at most ``max_fraction``).

    ``ranking: global`` with ``keep``: the same total (``sum_j (E_j - keep)``) removed by one ranking over every
    layer, so layers end uneven (the per-layer budget baseline of EvoESAP-style searches); no layer goes below
    ``max(min_experts, top_k + 1)``, ``top_k`` being the routing in force (a layer of ``top_k`` experts no
    longer chooses)."""
    sizes = [len(s) for s in shares]
    ranked = sorted((float(s[e]), layer, e) for layer, s in enumerate(shares) for e in range(len(s)))
    globally = cfg.ranking == "global"
    if cfg.keep and globally:
        target = max(cfg.keep[min(round_index, len(cfg.keep) - 1)], cfg.min_experts)
        total = sum(max(0, n - target) for n in sizes)
        removed = _removals(ranked, sizes, 0.0, max(cfg.min_experts, top_k + 1), True, budget=total)
    elif cfg.keep:
        target = cfg.keep[min(round_index, len(cfg.keep) - 1)]
        caps = [max(0, n - max(target, cfg.min_experts)) for n in sizes]
        removed = _removals(ranked, sizes, 0.0, cfg.min_experts, False, caps)
    elif cfg.remove_fraction is not None:
        removed = _removals(ranked, sizes, cfg.remove_fraction, cfg.min_experts, globally)
    else:
        cold = [c for c in ranked if c[0] < cfg.threshold]
        removed = _removals(cold, sizes, cfg.max_fraction, cfg.min_experts, globally)
    for layer, gone in enumerate(removed):
        while (sizes[layer] - len(gone)) % ep_size:  # keep the warmest candidates until the layout is even
            gone.pop()
    if cfg.equal_per_layer and removed:  # one expert count for the model: every layer removes the fewest
        fewest = min(len(g) for g in removed)
        removed = [g[:fewest] for g in removed]
    return [[e for e in range(n) if e not in set(gone)] for n, gone in zip(sizes, removed)]


def prune_round_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """A round as a metrics event (W&B and ``metrics.jsonl``)."""
    return {
        "event": "prune_round",
        "prune/round": record["round"],
        "prune/outcome": record["outcome"],
        "prune/val_loss_before": record["val_loss_before"],
        "prune/val_loss_after": record["val_loss_after"],
        # per-layer lists of different lengths: logged as JSON text, shares as histograms
        "prune/experts_after": {"per_layer": record["experts_after"]},
        "prune/removed": {"per_layer": record["removed"]},
        **{f"prune/layer{j}/share": sh for j, sh in enumerate(record["shares"])},
    }


class PruneHook:
    """Runs a pruning round at the start of every stage with ``prune: true``; its rounds are the records the
    run's summary and report show, and its checkpointed state."""

    state_key = "prune"
    summary_key = "prune_rounds"

    def __init__(self, cfg: PruneConfig) -> None:
        self.cfg = cfg
        self.rounds: list[dict[str, Any]] = []

    def on_stage_start(self, ops: StructureOps, state: StageState, stage: StageConfig) -> None:
        if stage.prune:
            self.run_round(ops, state)

    def on_stage_end(self, ops: StructureOps, state: StageState, stage: StageConfig) -> None:
        pass

    def records(self) -> list[dict[str, Any]]:
        return self.rounds

    def run_round(self, ops: StructureOps, state: StageState) -> dict[str, Any]:
        cfg = self.cfg
        number = len(self.rounds) + 1
        before_ids = [list(ids) for ids in ops.expert_ids()]
        v0 = ops.validate()
        snapshot = ops.snapshot(f"pre_prune_round{number}")
        profile = profile_experts(ops.forward, ops.moe_layers(), ops.profile_batches(cfg.profile_tokens))
        if cfg.mode == PruneMode.merge_ream:  # REAM's centres are REAP's top experts, whatever the criterion
            shares = profile.shares(PruneCriterion.reap)
        elif cfg.criterion == PruneCriterion.reconstruction:
            orders = ops.reconstruction_orders(cfg.merge_tokens, cfg.min_experts)
            shares = [criteria.shares(removal_scores(o, len(ids))) for o, ids in zip(orders, before_ids)]
        else:
            shares = profile.shares(cfg.criterion, cfg.seed)
        top_k = int(getattr(ops.moe_layers()[0], "top_k", 1)) if ops.moe_layers() else 1
        keep = select_survivors(shares, cfg, ops.ep_size, round_index=number - 1, top_k=top_k)
        record: dict[str, Any] = {
            "round": number,
            "stage": state.name,
            "step": ops.step,
            "criterion": cfg.criterion,
            "val_loss_before": v0,
            "experts_before": [len(ids) for ids in before_ids],
            "expert_ids_before": before_ids,
            "shares": [s.tolist() for s in shares],
            "profile": profile.as_dict(),
            "removed": [
                [before_ids[j][e] for e in range(len(k0)) if e not in set(k)]
                for j, (k, k0) in enumerate(zip(keep, before_ids))
            ],
        }
        if all(len(k) == len(ids) for k, ids in zip(keep, before_ids)):
            record.update(val_loss_after=v0, experts_after=record["experts_before"], outcome="nothing to prune")
        else:
            if cfg.mode in (PruneMode.merge, PruneMode.merge_ream):
                means = ops.expert_mean_outputs(cfg.merge_tokens)
                groups = [merge_groups(k, len(ids), m) for k, ids, m in zip(keep, before_ids, means)]
                record["merged"] = [[[ids[e] for e in g] for g in layer] for ids, layer in zip(before_ids, groups)]
                # merge: routed-token frequencies (M-SMoE); merge_ream: gate mass, REAM's gate weighting
                ops.merge_experts(groups, profile.gate_mass_E if cfg.mode == PruneMode.merge_ream else profile.routed_E)
            elif cfg.mode == PruneMode.mone:
                # MoNE: every cut expert becomes its mean output on the calibration tokens, still routed to
                means = ops.expert_mean_outputs(cfg.merge_tokens)
                ops.make_constants(keep, means)
                record["constants"] = [[ids[e] for e in range(len(ids)) if e not in set(k)]
                                       for ids, k in zip(before_ids, keep)]  # fmt: skip
            else:
                ops.remove_experts(keep)
            if fault_requested("hurt-prune-round", number):  # tests: make this round damage the model
                with torch.no_grad():
                    for layer in ops.moe_layers():
                        for p, _ in expert_pieces(layer)["w2_EFD"]:
                            p.mul_(100.0)
            v1 = ops.validate()
            record.update(val_loss_after=v1, experts_after=[len(k) for k in keep])
            if v1 - v0 > cfg.max_loss_increase:
                ops.restore(snapshot)
                record["val_loss_restored"] = ops.validate()  # equals val_loss_before: nothing of the round stays
                record["outcome"] = (
                    f"rolled back (loss +{v1 - v0:.4f} > prune.max_loss_increase={cfg.max_loss_increase})"
                )
            else:
                record["outcome"] = "kept"
        barrier()  # every rank is done with the snapshot
        if ops.is_main:
            shutil.rmtree(snapshot, ignore_errors=True)
            log.info(
                "prune round %d (%s): experts per layer %s -> %s, val loss %.4f -> %.4f: %s",
                number,
                cfg.criterion,
                record["experts_before"],
                record["experts_after"],
                v0,
                record["val_loss_after"],
                record["outcome"],
            )
        ops.log(prune_round_metrics(record))
        self.rounds.append(record)
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = list(state.get("rounds", []))
