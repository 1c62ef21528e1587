"""Adam moments by parameter name, read out of one DeepSpeed engine and written into another.

Structure changes (pruning, LoRA merges) rebuild the engine; the surviving parameters keep their moments and
the step count, so Adam's bias correction and running averages continue where they were.

Two kinds of optimizer hold the state: the plain ``torch.optim.AdamW`` the engine uses as is (fp32, ZeRO-0),
keyed by parameter; and DeepSpeed's wrappers (ZeRO-1/2, bf16) that keep fp32 partitions of flattened groups,
reached through DeepSpeed's tensor-fragment API (``safe_get/set_full_optimizer_state``, collective).
"""

from __future__ import annotations

import torch
from torch import nn

MOMENTS = ("exp_avg", "exp_avg_sq")
Moments = dict[str, dict[str, torch.Tensor]]


def _plain(engine) -> torch.optim.Optimizer | None:
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "optimizer") else None


def _inner(engine) -> torch.optim.Optimizer:
    return engine.optimizer.optimizer


def _relink(engine) -> None:
    """DeepSpeed links each parameter's view of its partition's optimizer state once, after the first step,
    and a group whose state did not exist yet then stays unlinked: link again against the current state."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _master_copies(engine) -> dict[int, torch.Tensor]:
    """DeepSpeed's unfused mixed-precision optimizer (bf16 at ZeRO-0): model parameter -> its fp32 master copy,
    whose state the inner optimizer keeps. Empty for other optimizers."""
    opt = engine.optimizer
    if not hasattr(opt, "fp16_groups") or not hasattr(opt, "fp32_groups"):
        return {}
    return {id(p): m for g16, g32 in zip(opt.fp16_groups, opt.fp32_groups) for p, m in zip(g16, g32)}


def read_moments(engine, model: nn.Module) -> tuple[Moments, float]:
    """``({name: {exp_avg, exp_avg_sq}}, step)`` for every trainable parameter that has optimizer state.
    Collective under ZeRO (every rank calls it with the same parameter names in the same order)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    plain = _plain(engine)
    masters = _master_copies(engine)
    if plain is None and not masters:
        _relink(engine)
    out: Moments = {}
    step = 0.0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if plain is not None or id(p) in masters:
            st = (plain or _inner(engine)).state.get(masters.get(id(p), p))
            if st and "exp_avg" in st:
                out[name] = {k: st[k].detach().clone() for k in MOMENTS}
                step = float(st["step"])
            continue
        values = {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}
        if all(v is not None for v in values.values()):
            out[name] = {k: v.detach().clone().view_as(p) for k, v in values.items()}
    if plain is None and not masters:
        for st in _inner(engine).state.values():
            if "step" in st:
                step = float(st["step"])
                break
    return out, step


def write_moments(engine, model: nn.Module, moments: Moments, step: float) -> int:
    """Install ``moments`` (by name) and the step count into a freshly built engine's optimizer; returns how
    many parameters received state. Collective under ZeRO."""
    from deepspeed.utils import safe_set_full_optimizer_state

    plain = _plain(engine)
    masters = _master_copies(engine)
    if plain is None and not masters:
        inner = _inner(engine)
        for group in inner.param_groups:  # DeepSpeed's partitions get their (lazy) state now
            for flat in group["params"]:
                if flat not in inner.state:
                    inner.state[flat] = {
                        "step": torch.tensor(step),
                        "exp_avg": torch.zeros_like(flat),
                        "exp_avg_sq": torch.zeros_like(flat),
                    }
        _relink(engine)
    count = 0
    for name, p in model.named_parameters():
        if not p.requires_grad or name not in moments:
            continue
        if plain is not None or id(p) in masters:
            target = masters.get(id(p), p)
            (plain or _inner(engine)).state[target] = {
                "step": torch.tensor(step),
                **{k: moments[name][k].to(target.dtype).clone() for k in MOMENTS},
            }
        else:
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, moments[name][k].to(torch.float32), k)
        count += 1
    return count
