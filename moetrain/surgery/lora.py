"""LoRA recovery with peft: adapters on the router, the experts and/or attention; only adapters train; merged
into the base weights when the stage ends (or before export).

Shape legend: E experts of a layer, El on this rank, r LoRA rank, D model dim.

Targets (``lora.targets``):

* ``router``: the router's ``weight_ED`` through peft's ``target_parameters`` (a parameter, not a Linear);
* ``experts``: native stacked expert weights ``w1_EDF``/``w3_EDF``/``w2_EFD`` through ``target_parameters``
  (peft gives each expert its own rank-r pair); DeepSpeed's per-expert ``nn.Linear`` modules as plain LoRA
  modules;
* ``attention``: ``wq``, ``wk``, ``wv``, ``wo`` (MLA: ``wq_a``, ``wq_b``, ``wkv_a``, ``wkv_b``, ``wo``).

Expert adapters belong to one expert, so under expert parallelism they live on the rank that owns the expert
and their gradients are reduced over the expert-data-parallel group only (tagged like the expert weights).
Their ``lora_A`` is drawn for all E experts of the layer from a seeded generator and sliced, so every
``parallel.ep_size`` starts from the same adapters (``lora_B`` starts at zero, as in peft).
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from moetrain.backends import Backend, get_backend
from moetrain.config import LoRAConfig, StageConfig
from moetrain.surgery.experts import ep_group_of, routing_core
from moetrain.surgery.ops import StructureOps
from moetrain.train.stages import StageState

# grouped-KV attention projections and DeepSeek's MLA projections (moetrain/model/attention.py)
ATTENTION_MODULES = ["wq", "wk", "wv", "wo", "wq_a", "wq_b", "wkv_a", "wkv_b"]
_SEED = 20240601


def peft_config(cfg: LoRAConfig, backend: Backend):
    from peft import LoraConfig

    params, patterns = [], []
    if "router" in cfg.targets:
        params.append("router.weight_ED")
    if "experts" in cfg.targets:
        expert_params, expert_patterns = backend.lora_expert_targets()
        params += expert_params
        patterns += expert_patterns
    if "attention" in cfg.targets:
        patterns.append(r".*\.attn\.(" + "|".join(ATTENTION_MODULES) + r")$")
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=0.0,  # peft's parameter adapters require it
        target_modules="|".join(patterns) if patterns else [],
        target_parameters=params or None,
        init_lora_weights=True,
    )


class LoRAAdapters:
    """Attach, count and merge the adapters of one model (in place)."""

    def __init__(self, cfg: LoRAConfig, backend: str) -> None:
        self.cfg = cfg
        self.backend = get_backend(backend)
        self.tuner = None

    @property
    def active(self) -> bool:
        return self.tuner is not None

    def attach(self, model: nn.Module) -> int:
        """Inject adapters, freeze everything else; returns the number of trainable adapter parameters."""
        from peft import LoraModel

        cores = [routing_core(b.ffn) for b in model.layers]
        self.tuner = LoraModel(model, peft_config(self.cfg, self.backend), "default")
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        self._init_adapters(model, [c for c in cores if c is not None])
        return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)

    @torch.no_grad()
    def _init_adapters(self, model: nn.Module, cores) -> None:
        """Every ``lora_A`` drawn from a generator seeded by its name, so adapters do not depend on what else
        the RNG served (the expert-parallel size changes how many expert adapters a rank builds). Expert
        adapters: drawn for every expert of the layer, this rank keeps its experts' rows, and they are tagged
        expert-parallel like the weights they adapt."""
        expert_modules = set()
        for j, core in enumerate(cores):
            group = ep_group_of(core)
            rank = torch.distributed.get_rank(group) if group is not None else 0
            for name, module in model.named_modules():
                if not name.startswith(_layer_prefix(model, core)) or not hasattr(module, "lora_A"):
                    continue
                if ".experts" not in name and "deepspeed_experts" not in name:
                    continue
                expert_modules.add(id(module))
                a = module.lora_A["default"].weight  # (El * r, in) for stacked experts, (r, in) per Linear expert
                El = getattr(module, "num_experts", 1)
                expert = int(name.split("deepspeed_experts.")[1].split(".")[0]) if "deepspeed_experts." in name else 0
                total = core.num_experts
                g = torch.Generator().manual_seed(_SEED + 1000 * j + _weight_index(module, name))
                full = _kaiming_like(torch.empty(total, a.shape[0] // El, a.shape[1]), g)
                first = rank * (total // (group.size() if group is not None else 1)) + expert
                a.copy_(full[first : first + El].reshape_as(a))
                base = _base_weight(module)
                for p in (module.lora_A["default"].weight, module.lora_B["default"].weight):
                    if getattr(base, "allreduce", True) is False:
                        p.allreduce = False
                        p.group_name = base.group_name
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A and id(module) not in expert_modules:
                a = module.lora_A["default"].weight
                a.copy_(_kaiming_like(torch.empty_like(a), torch.Generator().manual_seed(zlib.crc32(name.encode()))))

    def merge(self, model: nn.Module) -> None:
        """Fold the adapters into the base weights and remove them; every parameter trains again."""
        if self.tuner is None:
            return
        self.tuner.merge_and_unload()
        self.tuner = None
        for p in model.parameters():
            p.requires_grad_(True)


def _layer_prefix(model: nn.Module, core: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is core:
            return name.rsplit(".ffn", 1)[0] + ".ffn"
    raise ValueError("routing core not found in the model")


def _kaiming_like(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """peft's default ``lora_A`` init (kaiming-uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in)))."""
    bound = 1.0 / t.shape[-1] ** 0.5
    return t.uniform_(-bound, bound, generator=g)


def _weight_index(module: nn.Module, name: str) -> int:
    """1, 2 or 3 for the adapter of w1, w2 or w3 (stacked parameter or DeepSpeed Linear expert)."""
    which = getattr(module, "parameter_name", None) or name.rsplit(".", 1)[-1]
    return int(which[1])


def _base_weight(module: nn.Module) -> torch.Tensor:
    base = module.get_base_layer()
    name = getattr(module, "parameter_name", "weight")
    return getattr(base, name)


class LoRAStageHook:
    """Stages with ``lora: true``: adapters attached when the stage starts, merged when it ends. Stateless: a
    checkpoint inside a LoRA stage records the adapters in its structure."""

    state_key = None
    summary_key = None

    def on_stage_start(self, ops: StructureOps, state: StageState, stage: StageConfig) -> None:
        if stage.lora:
            ops.attach_adapters()

    def on_stage_end(self, ops: StructureOps, state: StageState, stage: StageConfig) -> None:
        if stage.lora:
            ops.merge_adapters()

    def records(self) -> list[dict]:
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
