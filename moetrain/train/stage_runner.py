"""The stage engine inside a run: applies the schedule to the model every step, marks stage boundaries, and
keeps the per-stage measurements that go into the run's report.

Shape legend: L MoE layers, E experts.

Structural actions (pruning, LoRA) plug in as :class:`StageHook` components called at boundaries; the
trainer loop itself knows nothing about them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from moetrain.model.moe import MoEStats, RoutingCore
from moetrain.runtime.distributed import all_reduce_sum
from moetrain.train.components import RoutingTable, StageHook
from moetrain.train.stages import RUNTIME_MOE_KEYS, StageSchedule, StageState

log = logging.getLogger("moetrain")


def expert_ffn_flops_per_token(sums_LX: torch.Tensor, num_experts: int, d_model: int, d_ff: int) -> float:
    """Forward expert-FFN FLOPs per token, counted from the assignments the experts actually computed
    (after top-k, capacity drops and rerouting): ``sum_layers computed * 3 GEMMs * 2 * D * F / tokens``."""
    E = num_experts
    computed = float(sums_LX[:, E : 2 * E].sum())
    tokens = float(sums_LX[0, 4 * E + 1]) if sums_LX.shape[0] else 0.0
    return computed * 3 * 2 * d_model * d_ff / max(tokens, 1.0)


class StageRunner:
    def __init__(
        self,
        schedule: StageSchedule,
        moe_layers: list[RoutingCore],
        d_model: int,
        d_ff: int,
        is_main: bool,
        num_experts: int,
        routing_table: Callable[[int, int], RoutingTable],
        hooks: list[StageHook] | None = None,
    ) -> None:
        """``num_experts``: width of the routing tables (the unpruned expert count); ``routing_table``: makes
        the per-stage table of routing sums. ``hooks`` run at boundaries (``on_stage_end`` after the ending
        stage is summarised, ``on_stage_start`` once the next stage's schedule is applied)."""
        self.schedule = schedule
        self.is_main = is_main
        self.moe_layers = moe_layers
        self.E = num_experts
        self.d_model, self.d_ff = d_model, d_ff
        self.hooks = hooks or []
        self.stage_routing = routing_table(len(moe_layers), self.E)
        self.seconds = 0.0
        self.tokens = 0
        self.tokens_spent = 0  # training tokens of the whole run so far (over all ranks)
        self.summaries: list[dict[str, Any]] = []  # closed stages, in order

    def attach(self, schedule: StageSchedule, moe_layers: list[RoutingCore]) -> None:
        """The model's structure changed (pruned experts, adapters): follow the new layers and schedule."""
        self.schedule = schedule
        self.moe_layers = moe_layers

    # ------------------------------------------------------------------ every step
    def apply(self, step: int) -> StageState:
        """Put the model in the state the schedule prescribes for ``step`` (idempotent)."""
        state = self.schedule.at(step)
        for layer in self.moe_layers:
            for key, value in state.moe.items():
                if key == "top_k":
                    layer.top_k = int(value)
                else:
                    setattr(layer, key, value)
        return state

    def record(self, stats_per_forward: list[list[MoEStats]], seconds: float, tokens: int) -> None:
        """One optimizer step: the MoE stats of each forward (micro-batch), its time and its global tokens."""
        for stats in stats_per_forward:
            self.stage_routing.update(stats)
        self.seconds += seconds
        self.tokens += tokens
        self.tokens_spent += tokens

    # ------------------------------------------------------------------ boundaries
    def is_stage_end(self, step: int) -> bool:
        """``step`` optimizer steps are done: does a stage end here (a new one starts, or the run ends)?"""
        return step in self.schedule.boundaries() or step == self.schedule.max_steps

    def close_stage(
        self, step: int, val_loss: float | None, comparison: dict[str, float] | None = None
    ) -> dict[str, Any]:
        """Collective (all-reduces the stage's routing sums). Summarise the stage that ends at ``step``;
        ``comparison``: its last validation against the base (``base_val_loss``, ``kl_base``, ``agree_base``)."""
        state = self.schedule.at(step - 1)
        sums = self.stage_routing.reduce_and_reset_sums()
        routing = self.stage_routing.metrics(sums) if self.E else {}
        L = sums.shape[0]
        utilization = []
        for i in range(L):
            counts = routing[f"moe/layer{i}/tokens_per_expert"]
            counts = counts[: self.moe_layers[i].num_experts] if i < len(self.moe_layers) else counts  # pruned
            utilization.append([c / max(sum(counts), 1.0) for c in counts])
        summary = {
            "stage": state.name,
            "index": state.index,
            "start_step": self.schedule.starts[state.index],
            "end_step": step,
            "val_loss": val_loss,
            "tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else math.nan,
            "tokens_spent": self.tokens_spent,
            "expert_flops_per_token": expert_ffn_flops_per_token(sums, self.E, self.d_model, self.d_ff),
            "dropped_frac": routing.get("moe/dropped_frac", 0.0),
            "entropy": sum(routing.get(f"moe/layer{i}/entropy", 0.0) for i in range(L)) / max(L, 1),
            "utilization": utilization,
            **{f"moe.{k}": v for k, v in state.moe.items()},
            "aux_loss_coef": state.aux_loss_coef,
            **(comparison or {}),
        }
        self.summaries.append(summary)
        self.seconds, self.tokens = 0.0, 0
        return summary

    def end_stage(self, ops: Any, step: int) -> None:
        """Run the hooks of the stage that ends at ``step`` (after :meth:`close_stage`) on ``ops``."""
        state = self.schedule.at(step - 1)
        for hook in self.hooks:
            hook.on_stage_end(ops, state, self.schedule.stages[state.index])

    def begin_stage(self, ops: Any, step: int) -> dict[str, Any]:
        """Apply the new stage, run its hooks, and describe what changed (for the log line and the event)."""
        before = self.schedule.at(step - 1)
        after = self.apply(step)
        changes = {f"moe.{k}": [before.moe[k], after.moe[k]] for k in RUNTIME_MOE_KEYS if before.moe[k] != after.moe[k]}
        for key in ("aux_loss_coef", "z_loss_coef", "lr_mult"):
            if getattr(before, key) != getattr(after, key):
                changes[key] = [getattr(before, key), getattr(after, key)]
        if before.frozen != after.frozen:
            changes["frozen_parameters"] = [len(before.frozen), len(after.frozen)]
        stage = self.schedule.stages[after.index]
        for action in ("prune", "lora"):  # structural actions the hooks carry out
            if getattr(stage, action):
                changes[action] = [False, True]
        for hook in self.hooks:
            hook.on_stage_start(ops, after, stage)
        return {"stage": after.name, "index": after.index, "changes": changes}

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Collective: the current stage's routing sums are summed over ranks (rank 0's copy is what
        DeepSpeed saves) and kept on rank 0 only, so a resumed run's stage totals are exact."""
        sums = all_reduce_sum(self.stage_routing.sums_LX.clone())
        if not self.is_main:
            self.stage_routing.sums_LX.zero_()
        else:
            self.stage_routing.sums_LX.copy_(sums)
        return {
            "routing_sums": sums.tolist(),
            "seconds": self.seconds,
            "tokens": self.tokens,
            "tokens_spent": self.tokens_spent,
            "summaries": self.summaries,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sums = torch.tensor(state["routing_sums"], dtype=torch.float64)
        self.stage_routing.sums_LX = sums if self.is_main else torch.zeros_like(sums)
        self.seconds, self.tokens = float(state["seconds"]), int(state["tokens"])
        self.tokens_spent = int(state.get("tokens_spent", 0))
        self.summaries = list(state["summaries"])
