"""Every recipe composes into the typed schema; every invalid value fails with one line naming the key."""

from __future__ import annotations

import pytest
from helpers.configs import assert_composition_error, assert_config_error, cli_config_error, compose_config
from helpers.launch import RECIPES
from hydra.errors import ConfigCompositionException

from moetrain.config import ConfigError, TrainConfig, validate
from moetrain.config.retired import check_retired_keys

RECIPE_NAMES = sorted(p.stem for p in (RECIPES / "recipe").glob("*.yaml"))
GROUP_OPTIONS = [
    (group.name, p.stem)
    for group in sorted(RECIPES.iterdir())
    if group.is_dir() and group.name not in ("recipe", "hydra")
    for p in sorted(group.glob("*.yaml"))
]


# compress starts from a trained model (model.init_from=hf:DIR): without one its export needs a family
RECIPE_NEEDS = {"compress": ["export.family=mixtral"]}


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_every_recipe_composes(recipe):
    cfg = compose_config([f"+recipe={recipe}", *RECIPE_NEEDS.get(recipe, [])])
    assert isinstance(cfg, TrainConfig)


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_group_option_composes(group, option):
    cfg = compose_config([f"{group}={option}"])
    assert isinstance(cfg, TrainConfig)


def test_recipe_overlay_overrides_defaults():
    cfg = compose_config(["+recipe=top2_baseline", "moe.top_k=1"])
    assert cfg.moe.top_k == 1  # command line wins over the overlay
    assert cfg.logging.wandb.group == "top2_baseline"


def test_unknown_key_and_wrong_type_fail_at_composition():
    with pytest.raises(ConfigCompositionException, match="moe.num_expert"):
        compose_config(["moe.num_expert=4"])
    with pytest.raises(ConfigCompositionException, match="moe.top_k"):
        compose_config(["moe.top_k=two"])


INVALID = [
    (["moe.top_k=9"], "moe.top_k=9", "between 1 and moe.num_experts=8"),
    (["moe.top_k=0"], "moe.top_k=0", "between 1"),
    (["moe.num_experts=12", "parallel.ep_size=8"], "moe.num_experts=12", "not divisible by parallel.ep_size=8"),
    (["parallel.zero_stage=3"], "parallel.zero_stage=3", "allowed: 0, 1, 2"),
    (["parallel.zero_stage=5"], "parallel.zero_stage=5", "allowed: 0, 1, 2"),
    (["moe.backend=deepspeed", "moe.a2a_chunks=2"], "moe.a2a_chunks=2", "allowed: 1"),
    (["moe.capacity_factor=-1.0"], "moe.capacity_factor=-1.0", "must be > 0"),
    (["moe.eval_capacity_factor=0"], "moe.eval_capacity_factor=0.0", "must be > 0, or null"),
    (["moe.a2a_chunks=0"], "moe.a2a_chunks=0", "must be >= 1"),
    (["moe.padded=true", "parallel.ep_size=2"], "moe.padded=True", "allowed: false"),
    (["moe.backend=deepspeed", "moe.padded=true"], "moe.padded=True", "moe.backend=deepspeed"),
    (["moe.backend=deepspeed", "moe.expert_impl=loop"], "moe.expert_impl=loop", "allowed: auto"),
    (["data.hf_config=wikitext-2-raw-v1"], "data.hf_config=wikitext-2-raw-v1", "needs data.hf_name"),
    (["model.init_from=hf:/nonexistent"], "model.init_from=hf:/nonexistent", "has no config.json"),
    (["model.init_from=s3://bucket/m"], "model.init_from=s3://bucket/m", "allowed: hf:PATH"),
    (["model.d_model=130"], "model.d_model=130", "not divisible by model.n_heads=4"),
    (["model.n_kv_heads=3"], "model.n_kv_heads=3", "must divide model.n_heads=4"),
    (["model.vocab_size=100"], "model.vocab_size=100", "257"),
    (["model.moe_every=9"], "model.moe_every=9", "allowed: 1..4"),
    (["optim.lr=0"], "optim.lr=0.0", "must be > 0"),
    (["optim.beta2=1.5"], "optim.beta2=1.5", "[0, 1)"),
    (["trainer.max_steps=0"], "trainer.max_steps=0", "must be > 0"),
    (["moe.aux_loss_coef=-0.1"], "moe.aux_loss_coef=-0.1", "must be >= 0"),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5", "(0, 1)"),
    (["data.path=/x", "data.hf_name=y"], "data.hf_name=y", "conflicts with data.path=/x"),
    (["prune.max_fraction=1.0"], "prune.max_fraction=1.0", "(0, 1)"),
    (["prune.min_experts=1"], "prune.min_experts=1", "between moe.top_k=2 and moe.num_experts=8"),
    (["prune.threshold=2"], "prune.threshold=2.0", "[0, 1]"),
    (["lora.rank=0"], "lora.rank=0", "must be > 0"),
    (["distill.enabled=true"], "distill.enabled=True", "needs a stage with prune: true"),
    (["distill.beta=1.5"], "distill.beta=1.5", "[0, 1]"),
    (["moe.expert_ids=[[0,0,1],[1,2,3]]"], "moe.expert_ids[0]=[0, 0, 1]", "repeats an expert id"),
    (["moe.expert_ids=[[0,9],[1,2]]"], "moe.expert_ids[0]=[0, 9]", "ids outside 0..7"),
    (["logging.baseline_run=/nonexistent"], "logging.baseline_run=/nonexistent", "no summary.json"),
    (["+recipe=top1_prune", "moe.n_group=2", "moe.topk_group=1"], "moe.n_group=2", "pruning stages"),
    (
        [
            "+recipe=top1_prune",
            "schedule.stages.4.lora=true",
            "lora.targets=[experts]",
            "moe.padded=true",
            "moe.capacity_factor=1.0",
        ],
        "moe.padded=True",
        "expert LoRA",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("overrides", "key_value", "allowed"), INVALID, ids=[i[1] for i in INVALID])
def test_invalid_values_name_the_key(overrides, key_value, allowed):
    assert_config_error(overrides, key_value, allowed)


def test_ep_size_must_divide_the_world_size():
    cfg = compose_config(["parallel.ep_size=4"])
    validate(cfg, world_size=8)
    with pytest.raises(ConfigError, match=r"^parallel.ep_size=4 does not divide the world size 2$"):
        validate(cfg, world_size=2)


def test_cli_bad_value_fails_fast_with_one_line(tmp_path):
    line = cli_config_error(tmp_path, "moe.top_k=9")
    assert line == "config error: moe.top_k=9 must be between 1 and moe.num_experts=8"


def test_a_bad_expert_impl_fails_at_composition_with_the_allowed_values():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["moe.expert_impl=fused"])
    assert "expected one of [auto, grouped_mm, triton, loop]" in str(err.value.__cause__)


# string choices are Enums: a bad value fails when the recipe is composed, with the allowed values
BAD_CHOICES = [
    (["moe.backend=tutel"], "native, deepspeed, megablocks"),
    (["moe.drop_policy=random"], "probs, position, reroute"),
    (["moe.score_func=relu"], "softmax, sigmoid"),
    (["parallel.dtype=fp8"], "fp32, bf16"),
    (["schedule.decay=step"], "cosine, linear, constant"),
    (["logging.wandb.mode=cloud"], "online, offline, disabled"),
    (["prune.criterion=magnitude"], "frequency, gate_mass, reap, ean, random, reconstruction, gate_weighted, saliency"),
    (["prune.ranking=model"], "layer, global"),
    (["lora.targets=[mlp]"], "router, experts, attention"),
]


@pytest.mark.parametrize(("overrides", "allowed"), BAD_CHOICES, ids=[b[0][0] for b in BAD_CHOICES])
def test_a_bad_choice_fails_at_composition_with_the_allowed_values(overrides, allowed):
    assert_composition_error(overrides, allowed)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("moe.grouped_mm=fused", "moe.grouped_mm=fused is retired; use moe.expert_impl=auto; allowed: auto, "),
        ("moe.grouped_mm=grouped", "moe.grouped_mm=grouped is retired; use moe.expert_impl=grouped_mm; allowed: "),
        (
            "moe.expert_impl=cpu_kernel",
            "moe.expert_impl=cpu_kernel is retired (the C++ CPU kernel was removed: ATen is the CPU path); "
            "use moe.expert_impl=auto; allowed: auto, grouped_mm, triton, loop",
        ),
    ],
)
def test_retired_keys_name_the_new_key(override, message):
    with pytest.raises(ConfigError) as err:
        check_retired_keys(["moe.top_k=1", override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_cli_retired_key_fails_with_one_line_naming_the_new_key(tmp_path):
    line = cli_config_error(tmp_path, "moe.expert_impl=cpu_kernel")
    assert line == (
        "config error: moe.expert_impl=cpu_kernel is retired (the C++ CPU kernel was removed: ATen is the CPU "
        "path); use moe.expert_impl=auto; allowed: auto, grouped_mm, triton, loop"
    )
