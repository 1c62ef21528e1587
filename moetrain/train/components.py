"""The interfaces of what the trainer is given from the layers above it (surgery, metrics, interop): it calls
them, never imports them. :func:`moetrain.interop.entry.build_trainer` assembles the real ones; tests may pass
fakes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from moetrain.config import ModelConfig, MoEConfig, StageConfig
from moetrain.model import ModelOutput
from moetrain.model.moe import MoEStats
from moetrain.train.stages import StageState


class MetricsLogger(Protocol):
    """Where metrics go (W&B, ``metrics.jsonl``); a no-op on ranks other than 0."""

    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def log_report(self, images: dict[str, Path], columns: list[str], rows: list[list[str]]) -> None: ...

    def wandb_location(self) -> str | None: ...

    def finish(self) -> None: ...


class RoutingTable(Protocol):
    """Routing statistics summed over forwards, reduced over ranks on demand (collective)."""

    sums_LX: torch.Tensor

    def update(self, stats: list[MoEStats]) -> None: ...

    def reduce_and_reset(self) -> dict[str, Any]: ...

    def reduce_and_reset_sums(self) -> torch.Tensor: ...


class Adapters(Protocol):
    """LoRA adapters of one model: attached, merged into the weights, and whether they are on now."""

    @property
    def active(self) -> bool: ...

    def attach(self, model: nn.Module) -> int: ...

    def merge(self, model: nn.Module) -> None: ...


class Distillation(Protocol):
    """A frozen teacher and the distillation term against it; the base teacher is also the run's reference."""

    @property
    def active(self) -> bool: ...

    @property
    def teacher_kind(self) -> str | None:
        """``distill.teacher`` of the teacher held now (None: none)."""
        ...

    @property
    def reference(self) -> nn.Module | None:
        """The frozen base model every validation compares with (``distill.teacher=base``), else None."""
        ...

    teacher_expert_ids: list[list[int]] | None

    def kl(self, student_BSV: torch.Tensor, inputs_BS: torch.Tensor) -> torch.Tensor: ...

    def teacher_forward(self, inputs_BS: torch.Tensor) -> ModelOutput: ...

    def build_teacher(self, state: Any, expert_ids: list[list[int]], from_model: bool) -> None:
        """A frozen copy of ``state``'s model (a ``ModelState``, which holds this object: typed ``Any`` so that
        the two modules do not import each other) with the ``expert_ids`` structure."""
        ...

    def drop_teacher(self) -> None: ...

    def checkpoint_component(self, rank: int) -> Any | None: ...


class StageHook(Protocol):
    """A structural action at stage boundaries (pruning, adapters), acting through ``ops`` (a
    ``surgery.ops.StructureOps``). ``state_key``: where its state goes in a checkpoint (None: stateless);
    ``summary_key``: where its records go in the run's summary (None: none)."""

    state_key: str | None
    summary_key: str | None

    def on_stage_start(self, ops: Any, state: StageState, stage: StageConfig) -> None: ...

    def on_stage_end(self, ops: Any, state: StageState, stage: StageConfig) -> None: ...

    def records(self) -> list[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


Exporter = Callable[[nn.Module, ModelConfig, MoEConfig, Path, bool], Path]


class FamilyExport(Protocol):
    """The final model in a model family's own layout (``export.hf``): written from the run's native export,
    then loaded back the way a user loads it, so the run measures what it hands over."""

    family: str

    def write(self, native_dir: Path, out: Path) -> Path:
        """``native_dir`` (the trainer's ``export/``) as the family's directory ``out``; one rank calls it."""
        ...

    def load(self, out: Path, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """The directory ``out`` loaded back (every rank): ``inputs_BS -> logits_BSV``."""
        ...


# (run_dir, stage summaries, extra rows, structural records, logging config, logger, comparison with the base:
# {"base": the base measurement, "throughput": ... or None} or None without a reference) -> report files
Reporter = Callable[
    [Path, list[dict[str, Any]], dict[str, Any], list[dict[str, Any]], Any, MetricsLogger, dict[str, Any] | None],
    Any,
]
# collective: (models, inputs_BS, labels_BS, rounds, tokens per run over all ranks) -> {"base_tokens_per_s",
# "model_tokens_per_s", "speedup", "rounds"}: forward + backward of models[0] (the base) and models[1] (the
# final model) timed in the same rounds (metrics/comparison.py)
Throughput = Callable[[list[nn.Module], torch.Tensor, torch.Tensor, int, int], dict[str, Any]]


@dataclass
class RunComponents:
    """Everything the trainer is given. ``structure_ops`` makes the interface the hooks act through from the
    trainer's model state and its validation; ``init_weights`` loads ``model.init_from``; ``throughput`` times
    the base against the final model at the end of a run with a reference; ``family_export`` writes the final
    model in its family's layout (``export.hf``)."""

    logger: MetricsLogger
    routing_table: Callable[[int, int], RoutingTable]
    adapters: Adapters
    distiller: Distillation
    structure_ops: Callable[..., Any]
    exporter: Exporter
    reporter: Reporter
    hooks: list[StageHook] = field(default_factory=list)
    init_weights: Callable[[nn.Module, Any], None] | None = None
    throughput: Throughput | None = None
    family_export: FamilyExport | None = None
    # MFU: model FLOPs of one training token at a top-k, and the peak FLOP/s of all the run's devices (None: unknown)
    train_flops_per_token: Callable[[int], float] | None = None
    peak_flops: float | None = None
