"""Stage schedules are pure functions of the step; validation names schedule.stages[i].key."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.configs import compose_config
from hydra.errors import ConfigCompositionException
from torch.utils.flop_counter import FlopCounterMode

from moetrain.config import ConfigError, MoEConfig, RampConfig, ScheduleConfig, StageConfig
from moetrain.metrics.routing import RoutingMetrics
from moetrain.model.moe import MoELayer
from moetrain.train.stage_runner import expert_ffn_flops_per_token
from moetrain.train.stages import RUNTIME_MOE_KEYS, StageSchedule, frozen_parameters, ramp_value

NAMES = ["tok_emb.weight", "layers.0.ffn.router.weight_ED", "layers.0.ffn.experts.w1_EDF", "layers.0.attn.wq.weight"]


def schedule(*stages, max_steps=100):
    return StageSchedule(ScheduleConfig(stages=list(stages)), MoEConfig(top_k=2, aux_loss_coef=0.01), max_steps, NAMES)


def test_ramps():
    lin = RampConfig(start=0.0, end=1.0, steps=10)
    assert [ramp_value(lin, s) for s in (0, 5, 10, 50)] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    cos = RampConfig(start=0.0, end=1.0, steps=10, shape="cosine")
    assert ramp_value(cos, 5) == pytest.approx(0.5) and ramp_value(cos, 2) == pytest.approx(
        0.5 * (1 - math.cos(0.2 * math.pi))
    )
    assert ramp_value(RampConfig(start=0.3), 7) == 0.3


def test_values_are_pure_functions_of_the_step_and_carry_over():
    s = schedule(
        StageConfig(name="a", steps=10),
        StageConfig(
            name="b",
            steps=20,
            moe={"top_k": 1, "capacity_factor": 1.25},
            aux_loss_coef=RampConfig(start=0.01, end=0.05, steps=10),
        ),
        StageConfig(name="c", steps=5, moe={"capacity_factor": None}, lr_mult=RampConfig(start=0.5)),
    )
    a, b0, b5, c = s.at(3), s.at(10), s.at(15), s.at(60)  # the last stage lasts until max_steps
    assert (a.name, a.moe["top_k"], a.moe["capacity_factor"], a.aux_loss_coef) == ("a", 2, None, 0.01)
    assert (b0.name, b0.step_in_stage, b0.moe["top_k"], b0.moe["capacity_factor"]) == ("b", 0, 1, 1.25)
    assert b5.aux_loss_coef == pytest.approx(0.03)
    # c keeps b's top_k, switches back to dropless, keeps b's final aux coefficient, sets its LR multiplier
    assert (c.name, c.moe["top_k"], c.moe["capacity_factor"], c.lr_mult) == ("c", 1, None, 0.5)
    assert c.aux_loss_coef == pytest.approx(0.05)
    assert s.boundaries() == [10, 30] and s.at(15) == s.at(15)


def test_trainable_sets_freeze_by_learning_rate():
    s = schedule(
        StageConfig(name="all", steps=5),
        StageConfig(name="router", steps=5, trainable="router"),
        StageConfig(name="no-emb", steps=5, freeze=["tok_emb.*"]),
    )
    assert frozen_parameters(s.stages[1], NAMES) == [
        "tok_emb.weight",
        "layers.0.ffn.experts.w1_EDF",
        "layers.0.attn.wq.weight",
    ]
    sig = s.param_frozen_pattern("layers.0.ffn.experts.w1_EDF")
    assert sig == (False, True, False)
    assert s.lr_factor(2, sig) == 1.0 and s.lr_factor(7, sig) == 0.0 and s.lr_factor(12, sig) == 1.0
    assert s.param_frozen_pattern("tok_emb.weight") == (False, True, True)


STAGE_ERRORS = [
    ("schedule.stages=[{name:a,steps:0}]", r"^schedule.stages\[0\].steps=0 must be > 0"),
    ("schedule.stages=[{name:a,steps:2},{name:a,steps:2}]", r"^schedule.stages\[1\].name=a is used by an earlier"),
    ("schedule.stages=[{name:a,steps:2,moe:{top_k:9}}]", r"^schedule.stages\[0\].moe.top_k=9 must be an integer betw"),
    ("schedule.stages=[{name:a,steps:500},{name:b,steps:2}]", r"^schedule.stages\[1\] \(b\) would start at step 500"),
]


@pytest.mark.parametrize(("override", "message"), STAGE_ERRORS)
def test_stage_validation_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_config([override])


# typed stage fields: a bad type, an unknown key under moe or a bad choice fails when the recipe is composed
STAGE_COMPOSITION_ERRORS = [
    ("schedule.stages=[{name:a,steps:2,moe:{num_experts:4}}]", "Key 'num_experts' not in 'StageMoEConfig'"),
    ("schedule.stages=[{name:a,steps:2,moe:{top_k:1.5}}]", "Value '1.5' of type 'float' could not be converted to Int"),
    ("schedule.stages=[{name:a,steps:2,moe:{min_capacity:null}}]", "Incompatible value 'None' for field of type 'int'"),
    (
        "schedule.stages=[{name:a,steps:2,moe:{capacity_factor:abc}}]",
        "Value 'abc' of type 'str' could not be converted",
    ),
    ("schedule.stages=[{name:a,steps:2,moe:{drop_policy:x}}]", "expected one of [probs, position, reroute]"),
    ("schedule.stages=[{name:a,steps:2,trainable:gates}]", "expected one of [all, router, experts, non_experts]"),
    ("schedule.stages=[{name:a,steps:2,lr_mult:{start:1,shape:step}}]", "expected one of [linear, cosine]"),
]


@pytest.mark.parametrize(("override", "message"), STAGE_COMPOSITION_ERRORS)
def test_stage_type_errors_fail_at_composition(override, message):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config([override])
    assert message in str(err.value.__cause__)


def test_a_stage_moe_key_set_to_null_is_set_and_an_unset_key_is_not():
    stages = "schedule.stages=[{name:a,steps:10},{name:b,steps:10,moe:{capacity_factor:null}}]"
    cfg = compose_config(["moe.capacity_factor=1.0", "moe.drop_policy=reroute", stages])
    assert [st.moe.overrides() for st in cfg.schedule.stages] == [{}, {"capacity_factor": None}]
    s = StageSchedule(cfg.schedule, cfg.moe, cfg.trainer.max_steps)
    base = {k: getattr(cfg.moe, k) for k in RUNTIME_MOE_KEYS}
    assert s.at(0).moe == base and s.at(10).moe == {**base, "capacity_factor": None}
    assert type(s.at(10).moe["drop_policy"]) is str  # plain values: they go into logs and checkpoints


def test_top2_to_top1_recipe_composes_with_its_stages():
    cfg = compose_config(["+recipe=top2_to_top1"])
    assert [s.name for s in cfg.schedule.stages] == ["top2", "top1"]
    assert cfg.schedule.stages[1].moe.top_k == 1 and cfg.moe.top_k == 2


def test_expert_flops_accounting_matches_torch_flop_counter():
    """Counted from computed assignments, equal to what FlopCounterMode measures for the expert GEMMs."""
    D, F = 16, 24
    for k, cf in ((2, None), (1, None), (2, 0.5)):
        torch.manual_seed(0)
        layer = MoELayer(
            D, F, MoEConfig(num_experts=4, top_k=k, capacity_factor=cf, min_capacity=1, expert_impl="loop")
        )
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.5)
        x = torch.randn(1, 64, D)
        routing_only = FlopCounterMode(display=False)
        with routing_only:
            layer.router(x.view(64, D))
        counter = FlopCounterMode(display=False)
        with counter:
            _, stats = layer(x)
        expert_flops = counter.get_total_flops() - routing_only.get_total_flops()
        metrics = RoutingMetrics(1, 4)
        metrics.update([stats])
        assert expert_ffn_flops_per_token(metrics.sums_LX, 4, D, F) * 64 == pytest.approx(expert_flops)
