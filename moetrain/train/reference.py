"""The run's validation, and the base model as its reference (``distill.teacher=base``).

Every validation is the mean next-token cross-entropy over the same fixed validation batches of all ranks.
With a reference, each batch also goes through the frozen base model and :func:`comparison_sums` adds up, over
tokens and ranks (float64 sums, one division): the base's cross-entropy, KL(base || model) at temperature 1 and
top-1 next-token agreement. Logged as ``val/base_loss``, ``val/nll_gap`` (= ``val/loss - val/base_loss``),
``val/kl_base``, ``val/agree_base`` next to ``val/loss``.

At step 0 of a fresh run the first such validation (the model as stage 0 sets it up, against the base) is the
*base measurement*: the base's loss, its expert FLOPs per token (from the assignments it computed in that
forward), experts per layer and parameters; it is loop state, so a resumed run reports it too. At the end of the
run :meth:`Validation.throughput` times forward + backward of a training micro-batch through the base and the
final model in the same rounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moetrain.config import TrainConfig
from moetrain.runtime.distributed import all_reduce_sum
from moetrain.train.components import RoutingTable, Throughput
from moetrain.train.data import DataPipeline
from moetrain.train.evaluation import COMPARISON, comparison_sums, cross_entropy_sums
from moetrain.train.model_state import ModelState, count_parameters
from moetrain.train.stage_runner import expert_ffn_flops_per_token

# validation metrics -> the stage summary's keys
STAGE_KEYS = {"val/base_loss": "base_val_loss", "val/kl_base": "kl_base", "val/agree_base": "agree_base"}


def comparison_metrics(sums: torch.Tensor) -> dict[str, float]:
    """The validation metrics of :func:`comparison_sums` totals (all batches, all ranks): each sum over tokens."""
    s = dict(zip(COMPARISON, (float(x) for x in sums)))
    n = s["tokens"]
    loss, base = s["ce"] / n, s["ce_ref"] / n
    return {
        "val/loss": loss,
        "val/base_loss": base,
        "val/nll_gap": loss - base,
        "val/kl_base": s["kl"] / n,
        "val/agree_base": s["agree"] / n,
    }


class Validation:
    """Validation of a run's model (collective: every rank calls it at the same point), the base measurement
    and the one-run throughput. ``state_key``: the base measurement in a checkpoint's loop state."""

    state_key = "base"

    def __init__(
        self,
        state: ModelState,
        data: DataPipeline,
        cfg: TrainConfig,
        routing_table: Callable[[int, int], RoutingTable],
        throughput: Throughput | None = None,
    ) -> None:
        self.state, self.data, self.cfg = state, data, cfg
        self.routing_table, self.time_models = routing_table, throughput
        self.last: dict[str, float] = {}  # the latest validation's metrics
        self.base: dict[str, Any] | None = None  # the base measurement

    @property
    def reference(self) -> nn.Module | None:
        return self.state.distiller.reference

    @torch.no_grad()
    def run(self, reference_routing: RoutingTable | None = None) -> dict[str, float]:
        """The validation metrics (``val/loss``; with a reference also the comparisons); ``reference_routing``
        sums the routing statistics of the reference's forwards."""
        engine = self.state.engine
        engine.eval()
        if self.reference is None:
            batches = self.data.val_batches(self.cfg.trainer.eval_batches)
            totals = all_reduce_sum(cross_entropy_sums(engine, batches, engine.device))
            self.last = {"val/loss": float(totals[0] / totals[1])}
            return self.last
        self.last = self._compare(lambda inputs: engine(inputs).logits_BSV, engine.device, reference_routing)
        return self.last

    @torch.no_grad()
    def compare(self, logits: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Collective: the validation comparisons of another model of the run's (``logits``: ``inputs_BS ->
        logits_BSV``, e.g. its export loaded back) against the reference, on the same validation batches."""
        return self._compare(logits, self.state.engine.device)

    def _compare(
        self, logits: Callable[[torch.Tensor], torch.Tensor], device, reference_routing: RoutingTable | None = None
    ) -> dict[str, float]:
        sums = torch.zeros(len(COMPARISON), dtype=torch.float64)
        for inputs, labels in self.data.val_batches(self.cfg.trainer.eval_batches):
            inputs = inputs.to(device)
            ref = self.state.distiller.teacher_forward(inputs)
            if reference_routing is not None:
                reference_routing.update(ref.moe_stats)
            sums += comparison_sums(logits(inputs), ref.logits_BSV, labels.to(device))
        return comparison_metrics(all_reduce_sum(sums))

    def measure_base(self, step: int) -> dict[str, Any]:
        """Collective. At step 0 of a run with a reference and no base measurement yet: validate, keep the base
        measurement and return the metrics to log at step 0 (else nothing)."""
        reference = self.reference
        if reference is None or self.base is not None or step != 0:
            return {}
        moe, m = self.cfg.moe, self.cfg.model
        routing = self.routing_table(len(reference.moe_layers()), moe.num_experts)
        metrics = self.run(routing)
        sums = routing.reduce_and_reset_sums()
        self.base = {
            "val_loss": metrics["val/base_loss"],
            "expert_flops_per_token": expert_ffn_flops_per_token(sums, moe.num_experts, m.d_model, m.d_ff),
            "experts_per_layer": [len(ids) for ids in self.state.distiller.teacher_expert_ids],
            "params": count_parameters(reference, self.cfg.parallel.ep_size),
        }
        return {**metrics, **{f"base/{k}": v for k, v in self.base.items() if k != "experts_per_layer"}}

    def stage_summary(self) -> dict[str, float]:
        """The latest validation's comparisons under the stage summary's keys (none without a reference)."""
        return {key: self.last[name] for name, key in STAGE_KEYS.items() if name in self.last}

    def throughput(self) -> dict[str, Any] | None:
        """Collective, at the end of a run with a reference (None without one, or with
        ``trainer.throughput_rounds=0``): training tokens/s of the base and of the final model measured in the
        same rounds (``components.Throughput``). Both are timed as copies outside the engine, in the model's
        dtype (the live model, its gradients, its optimizer and the RNG stream stay as they are); the final
        copy runs the last stage's top-k and capacities, the base its own top-k, dropless."""
        rounds = self.cfg.trainer.throughput_rounds
        if self.reference is None or self.time_models is None or rounds == 0:
            return None
        state = self.state
        live = next(state.model.parameters())
        final_moe = state.schedule.at(max(state.step - 1, 0)).moe
        dropless = {"capacity_factor": None, "eval_capacity_factor": None}
        base = state.model_copy(self.reference, state.distiller.teacher_expert_ids, dropless)
        final = state.model_copy(state.model, state.expert_ids(), final_moe)
        models = [m.to(device=live.device, dtype=live.dtype).train() for m in (base, final)]
        inputs, labels = (x.to(live.device) for x in next(iter(self.data.profile_batches(1))))
        cuda = [live.device.index or 0] if live.is_cuda else []
        with torch.random.fork_rng(devices=cuda):  # the copies' router jitter draws leave the run's RNG alone
            result = self.time_models(models, inputs, labels, rounds, inputs.numel() * state.env.world_size)
        for model in models:
            model.zero_grad(set_to_none=True)
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"measurement": self.base}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base = state.get("measurement")


def gap_recovered(base: dict[str, Any], rounds: list[dict[str, Any]], final_loss: float | None) -> dict[str, Any]:
    """How much of the gap the last kept cut opened recovery took back: ``(L_cut - L_final) / (L_cut - L_base)``
    with ``L_cut`` the NLL right after that cut (1: back at the base, 0: no better than right after the cut);
    empty without a kept cut or a final loss."""
    cuts = [r for r in rounds if r.get("outcome") == "kept"]
    if not cuts or final_loss is None or math.isnan(final_loss):
        return {}
    cut, ref = cuts[-1]["val_loss_after"], base["val_loss"]
    fraction = (cut - final_loss) / (cut - ref) if cut != ref else math.nan
    return {"cut_gap": cut - ref, "final_gap": final_loss - ref, "fraction": fraction}


def tolerance_check(base_loss: float, final_loss: float | None, max_gap_pct: float | None) -> dict[str, Any] | None:
    """``recover.max_nll_gap_pct`` judged on the final model: its NLL gap to the base in % of the base's NLL;
    None without a tolerance."""
    if max_gap_pct is None:
        return None
    gap_pct = math.nan if final_loss is None else 100 * (final_loss - base_loss) / base_loss
    return {"max_nll_gap_pct": max_gap_pct, "nll_gap_pct": gap_pct, "met": bool(gap_pct <= max_gap_pct)}
