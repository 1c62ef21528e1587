"""The string choices of the schema as Enums: OmegaConf checks them when a recipe is composed, so a bad value
fails there with the allowed values (``Invalid value 'tutel', expected one of [native, deepspeed]``).

Members are named as their values, so recipes and the command line spell them as before. They are ``str``
subclasses: ``cfg.moe.backend == "native"``, ``in ("a", "b")``, dict lookups keyed by strings (a member hashes
as its value) and f-strings read as plain strings. :func:`plain` turns them into plain strings where a config
leaves the process (checkpoints, JSON files).
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from enum import Enum
from typing import Any


class Choice(str, Enum):
    """A string choice: compares, prints and serialises (JSON) as its value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


def plain(obj: Any) -> Any:
    """``obj`` with dataclasses as dicts (as :func:`dataclasses.asdict`) and every Enum as its value, inside
    dicts, lists and tuples too: what ``torch.load(weights_only=True)``, JSON and YAML read back."""
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, dict):
        return {plain(k): plain(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(plain(v) for v in obj)
    return obj


class ExpertImpl(Choice):
    """``moe.expert_impl``: how the expert FFN runs (moetrain/kernels)."""

    # grouped_mm where device and dtype support it (ATen on CPU; bf16 on sm90+ CUDA), triton on other CUDA GPUs and
    # dtypes, else loop (with a one-time warning)
    auto = "auto"
    grouped_mm = "grouped_mm"  # torch._grouped_mm
    triton = "triton"  # DeepSpeed's Triton grouped GEMM (CUDA)
    loop = "loop"  # one GEMM per expert


class MoEBackend(Choice):
    """``moe.backend``: our MoE layer, or DeepSpeed's with our router as its gate (moetrain/backends)."""

    native = "native"
    deepspeed = "deepspeed"
    megablocks = "megablocks"  # MegaBlocks' dropless MLP behind our router (CUDA)


class DropPolicy(Choice):
    """``moe.drop_policy``: which assignments an expert over capacity drops (moetrain/model/dispatch.py)."""

    probs = "probs"  # the lowest gates
    position = "position"  # the latest tokens
    reroute = "reroute"  # dropped assignments go to the next-best expert with room


class ScoreFunc(Choice):
    """``moe.score_func``: router scores from logits."""

    softmax = "softmax"  # Switch, Mixtral
    sigmoid = "sigmoid"  # DeepSeek-V3


class GroupScore(Choice):
    """``moe.group_score``: a group's score in group-limited routing, from its experts' scores."""

    max = "max"  # DeepSeek-V2
    top2_sum = "top2_sum"  # DeepSeek-V3


class Attention(Choice):
    """``model.attention``."""

    gqa = "gqa"  # grouped-query attention
    mla = "mla"  # DeepSeek multi-head latent attention (model.mla.*)


class QKNorm(Choice):
    """``model.qk_norm``."""

    none = "none"
    head = "head"  # RMSNorm over each head's q / k (Qwen3-MoE)
    full = "full"  # RMSNorm over all of q / k (OLMoE)


class RopeScaling(Choice):
    """``model.rope_scaling.type``."""

    default = "default"  # none
    yarn = "yarn"  # YaRN


class DType(Choice):
    """``parallel.dtype``: the training precision."""

    fp32 = "fp32"
    bf16 = "bf16"


class LRDecay(Choice):
    """``schedule.decay``: the LR after warmup."""

    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class WandbMode(Choice):
    """``logging.wandb.mode`` (null: online when an API key is configured, else offline)."""

    online = "online"
    offline = "offline"
    disabled = "disabled"


class PruneCriterion(Choice):
    """``prune.criterion``: what an expert's score is (moetrain/surgery/criteria.py has each formula)."""

    frequency = "frequency"  # routed tokens
    gate_mass = "gate_mass"  # the router's gate mass
    reap = "reap"  # REAP: mean over routed tokens of gate * ||expert output||
    ean = "ean"  # mean over routed tokens of ||expert output|| (no gate)
    random = "random"  # a seeded chance baseline
    reconstruction = "reconstruction"  # greedy: the expert whose removal changes the layer's output least
    # the names before compression criteria had their papers' names (recipes and checkpoints still say them)
    gate_weighted = "gate_mass"
    saliency = "reap"


# "global" is a Python keyword: the functional API names the members
PruneRanking = Choice("PruneRanking", [("layer", "layer"), ("global", "global")], module=__name__)
PruneRanking.__doc__ = (
    "``prune.ranking``: ``layer`` (threshold and caps per layer) | ``global`` (one ranking over every layer)."
)


class PruneMode(Choice):
    """``prune.mode``: what happens to the experts a round cuts."""

    drop = "drop"  # removed
    merge = "merge"  # folded into the survivor whose mean output is closest (moetrain/surgery/merging.py)
    # REAM: REAP's top experts are the centres; each other expert folds into the centre with the closest mean
    # output, the members weighted by their gate mass (moetrain/surgery/merging.py)
    merge_ream = "merge_ream"
    # MoNE (arXiv 2507.00390): each cut expert becomes a constant, its mean output on the calibration tokens,
    # still routed to and scaled by its gate (moetrain/surgery/experts.py constant_model)
    mone = "mone"


class DistillTeacher(Choice):
    """``distill.teacher``: the frozen model the distillation term compares with."""

    pre_prune = "pre_prune"  # a copy taken just before the first pruning round
    # the model at step 0 of a fresh run (model.init_from loaded), at its own top-k and dropless; also the
    # reference every validation compares with (train/reference.py)
    base = "base"


class RecoverTrainable(Choice):
    """``recover.trainable``: what a recovery stage (``schedule.stages[i].recover: true``) trains."""

    router = "router"  # the routers only (the stage's trainable=router)
    lora = "lora"  # LoRA adapters on lora.targets, merged at the stage's end (the stage's lora=true)
    full = "full"  # every weight (the stage's trainable=all)


class LoRATarget(Choice):
    """An entry of ``lora.targets``: the modules that get adapters."""

    router = "router"
    experts = "experts"
    attention = "attention"


class RampShape(Choice):
    """``schedule.stages[i].<ramp>.shape``: how a ramp goes from ``start`` to ``end``."""

    linear = "linear"
    cosine = "cosine"


class Trainable(Choice):
    """``schedule.stages[i].trainable``: the parameters a stage trains."""

    all = "all"
    router = "router"
    experts = "experts"
    non_experts = "non_experts"
