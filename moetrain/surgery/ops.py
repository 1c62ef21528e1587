"""``StructureOps``: the small interface stage hooks act through (pruning rounds, LoRA stages), and its
implementation on a run's :class:`~moetrain.train.model_state.ModelState`.

A hook never reaches into the trainer: it asks for validation, snapshots, profiles, and structure changes
here, so it can be tested in-process against a fake (tests/surgery/test_structure_ops.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

from moetrain.model.moe import RoutingCore
from moetrain.surgery.experts import constant_model, ep_group_of, merge_model, prune_model
from moetrain.surgery.merging import expert_mean_outputs
from moetrain.surgery.reconstruction import reconstruction_orders
from moetrain.train.components import MetricsLogger
from moetrain.train.model_state import ModelState
from moetrain.train.optim_state import read_moments, write_moments

log = logging.getLogger("moetrain")


class StructureOps(Protocol):
    """What a stage hook may do to the model it is attached to (every method is collective)."""

    @property
    def step(self) -> int: ...

    @property
    def ep_size(self) -> int: ...

    @property
    def is_main(self) -> bool: ...

    def moe_layers(self) -> list[RoutingCore]: ...

    def expert_ids(self) -> list[list[int]]:
        """Per MoE layer, the original ids of its current experts."""
        ...

    def profile_batches(self, tokens: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed sample of ``tokens`` training tokens (over all ranks) for routing profiles."""
        ...

    def forward(self, inputs_BS: torch.Tensor) -> Any:
        """The model's forward (a ``ModelOutput``) on this rank's device."""
        ...

    def validate(self) -> float:
        """Mean validation loss (nats) over all ranks."""
        ...

    def remove_experts(self, keep: list[list[int]]) -> None:
        """MoE layer j keeps ``keep[j]`` (current indices, in their new order); optimizer moments carried."""
        ...

    def merge_experts(self, groups: list[list[list[int]]], weights: list[torch.Tensor]) -> None:
        """MoE layer j becomes one expert per group of ``groups[j]`` (current indices, dominant first), its
        weights the ``weights[j]``-weighted mean of the members'; optimizer moments mixed alike."""
        ...

    def make_constants(self, keep: list[list[int]], means: list[torch.Tensor]) -> None:
        """MoNE: MoE layer j keeps ``keep[j]`` (current indices) and every other expert e becomes the constant
        ``means[j][e]``, still routed to (surgery/experts.py ``constant_model``)."""
        ...

    def expert_mean_outputs(self, tokens: int) -> list[torch.Tensor]:
        """Per MoE layer, every expert's mean output (E, D) over ``tokens`` calibration tokens (all ranks)."""
        ...

    def reconstruction_orders(self, tokens: int, floor: int) -> list[list[int]]:
        """Per MoE layer, the experts in the order greedy output reconstruction removes them, down to
        ``floor`` (surgery/reconstruction.py), over ``tokens`` calibration tokens."""
        ...

    def attach_adapters(self) -> int: ...

    def merge_adapters(self) -> None: ...

    def snapshot(self, name: str) -> Path:
        """A rollback point (a full checkpoint that never becomes ``latest``)."""
        ...

    def restore(self, snapshot: Path) -> None: ...

    def log(self, metrics: dict[str, Any]) -> None:
        """Metrics (an event) at the current step, on rank 0's sinks."""
        ...


class ModelStructureOps:
    """:class:`StructureOps` on a run's model state; with ``distill.enabled`` and ``distill.teacher=pre_prune``
    the distillation teacher is taken before the first removal (a base teacher exists from step 0 and stays)."""

    def __init__(self, state: ModelState, validate: Callable[[], float], data: Any, logger: MetricsLogger) -> None:
        self.state, self._validate, self.data, self.logger = state, validate, data, logger

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def ep_size(self) -> int:
        return self.state.cfg.parallel.ep_size

    @property
    def is_main(self) -> bool:
        return self.state.env.is_main

    def moe_layers(self) -> list[RoutingCore]:
        return self.state.moe_layers

    def expert_ids(self) -> list[list[int]]:
        return self.state.expert_ids()

    def profile_batches(self, tokens: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return self.data.profile_batches(tokens)

    def forward(self, inputs_BS: torch.Tensor) -> Any:
        engine = self.state.engine
        return engine(inputs_BS.to(engine.device))

    def validate(self) -> float:
        return self._validate()

    def remove_experts(self, keep: list[list[int]]) -> None:
        self._change_experts(
            keep, lambda model, moe, ep, group, moments: prune_model(model, moe, keep, ep, group, moments)
        )

    def merge_experts(self, groups: list[list[list[int]]], weights: list[torch.Tensor]) -> None:
        # a merged expert carries the id of its dominant (first) member
        firsts = [[g[0] for g in layer] for layer in groups]
        self._change_experts(
            firsts, lambda model, moe, ep, group, moments: merge_model(model, moe, groups, weights, ep, group, moments)
        )

    def make_constants(self, keep: list[list[int]], means: list[torch.Tensor]) -> None:
        old_ids = self.state.expert_ids()
        order = [[*k, *(e for e in range(len(ids)) if e not in set(k))] for k, ids in zip(keep, old_ids)]
        # the constants' original ids are written -(e + 1) (moe.expert_ids)
        new_ids = [[ids[e] if n < len(k) else -(ids[e] + 1) for n, e in enumerate(o)]
                   for ids, k, o in zip(old_ids, keep, order)]  # fmt: skip

        def change(model, moe, ep, group, moments):
            return constant_model(model, moe, keep, means, new_ids, group, moments)

        self._change_experts(order, change, new_ids)

    def _change_experts(
        self, firsts: list[list[int]], change: Callable[..., dict], new_ids: list[list[int]] | None = None
    ) -> None:
        """Teacher first (pre_prune distillation), then the change with the optimizer moments carried, the new
        structure recorded (``moe.expert_ids``: per layer the original id of each new expert) and the engine
        rebuilt."""
        state, cfg = self.state, self.state.cfg
        pre_prune = cfg.distill.enabled and cfg.distill.teacher == "pre_prune"
        if pre_prune and state.distiller.teacher_expert_ids is None:
            state.distiller.build_teacher(state, state.expert_ids(), from_model=True)
        moments, opt_step = read_moments(state.engine, state.model)
        old_ids = state.expert_ids()
        layers = state.moe_layers
        ep_group = ep_group_of(layers[0]) if layers else None
        moments = change(state.model, cfg.moe, cfg.parallel.ep_size, ep_group, moments)
        cfg.moe.expert_ids = new_ids or [[ids[e] for e in k] for ids, k in zip(old_ids, firsts)]
        state.rebuild()
        write_moments(state.engine, state.model, moments, opt_step)

    def expert_mean_outputs(self, tokens: int) -> list[torch.Tensor]:
        return expert_mean_outputs(self.state.model, self.forward, self.data.profile_batches(tokens))

    def reconstruction_orders(self, tokens: int, floor: int) -> list[list[int]]:
        return reconstruction_orders(self.state.model, self.forward, self.data.profile_batches(tokens), floor)

    def attach_adapters(self) -> int:
        n = self.state.attach_adapters()
        if self.is_main:
            log.info("LoRA adapters on %s: %d trainable parameters", ", ".join(self.state.cfg.lora.targets), n)
        return n

    def merge_adapters(self) -> None:
        self.state.merge_adapters()

    def snapshot(self, name: str) -> Path:
        return self.state.save(tag=name)

    def restore(self, snapshot: Path) -> None:
        self.state.restore(snapshot)

    def log(self, metrics: dict[str, Any]) -> None:
        if self.is_main:
            self.logger.log(metrics, step=self.step)
