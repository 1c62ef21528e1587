"""A trainer assembled from the components of every layer: the one place that sees them all (the composition
root). Features are chosen here, once, by the config; the trainer only loops."""

from __future__ import annotations

from pathlib import Path

import torch

from moetrain.config import TrainConfig
from moetrain.interop.export import export_model
from moetrain.interop.hf import load_hf_weights
from moetrain.interop.hf.run_export import HFRunExport
from moetrain.metrics.comparison import measure_throughput
from moetrain.metrics.flops import device_peak_tflops, training_flops_per_token
from moetrain.metrics.report import report_run
from moetrain.metrics.routing import RoutingMetrics
from moetrain.metrics.tracking import build_logger
from moetrain.runtime.distributed import init_distributed
from moetrain.surgery.distill import Distiller
from moetrain.surgery.lora import LoRAAdapters, LoRAStageHook
from moetrain.surgery.ops import ModelStructureOps
from moetrain.surgery.pruning import PruneHook
from moetrain.train.components import RunComponents
from moetrain.train.trainer import Trainer


def peak_flops(cfg: TrainConfig, world_size: int) -> float | None:
    """Peak FLOP/s of all the run's devices: ``trainer.peak_tflops``, else the GPU's datasheet value where its
    name is known (metrics/flops.py); None on CPU or an unknown device."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    peak = cfg.trainer.peak_tflops or device_peak_tflops(name, str(cfg.parallel.dtype))
    return peak * 1e12 * world_size if peak else None


def build_trainer(cfg: TrainConfig, run_dir: Path) -> Trainer:
    """Collective: the process group, then the trainer of ``cfg`` (a resolved config) writing to ``run_dir``."""
    env = init_distributed()
    parts = RunComponents(
        logger=build_logger(cfg, run_dir, env.is_main),
        routing_table=RoutingMetrics,
        adapters=LoRAAdapters(cfg.lora, cfg.moe.backend),
        distiller=Distiller(cfg.distill),
        structure_ops=ModelStructureOps,
        exporter=export_model,
        reporter=report_run,
        hooks=[PruneHook(cfg.prune), LoRAStageHook()],
        init_weights=load_hf_weights if cfg.model.init_from else None,
        throughput=measure_throughput,
        family_export=HFRunExport(cfg) if cfg.export.hf else None,
        train_flops_per_token=training_flops_per_token(cfg.model, cfg.moe),
        peak_flops=peak_flops(cfg, env.world_size),
    )
    return Trainer(cfg, run_dir, env, parts)
