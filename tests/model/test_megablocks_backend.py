"""moe.backend=megablocks: what runs without CUDA (the config mapping to MegaBlocks' Arguments, the weight layouts
both ways, the one-line refusals), and the layer against the native one on a GPU (marked gpu)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.configs import cli_config_error, compose_config

from moetrain.backends.megablocks import from_megablocks, megablocks_arguments, to_megablocks
from moetrain.config import ConfigError, ModelConfig, MoEConfig, validate


def test_our_config_maps_to_megablocks_arguments_without_its_kernels():
    args = megablocks_arguments(ModelConfig(d_model=64, d_ff=96), MoEConfig(num_experts=8, top_k=2), "bf16", 0.02, 0.01)
    assert {k: args[k] for k in ("hidden_size", "ffn_hidden_size", "moe_num_experts", "moe_top_k")} == {
        "hidden_size": 64, "ffn_hidden_size": 96, "moe_num_experts": 8, "moe_top_k": 2}  # fmt: skip
    assert (args["mlp_type"], args["mlp_impl"], args["activation_fn"]) == ("glu", "grouped", F.silu)  # SwiGLU, grouped
    assert args["bias"] is False and args["return_bias"] is False
    assert args["moe_capacity_factor"] == 0 and args["moe_loss_weight"] == 0.0  # dropless; our losses, our gates
    assert args["moe_normalize_expert_weights"] is None and args["moe_jitter_eps"] is None
    assert (args["bf16"], args["fp16"], args["moe_expert_model_parallelism"]) == (True, False, False)
    w = torch.empty(1000)
    args["init_method"](w)
    assert 0.015 < float(w.std()) < 0.025  # our init: normal(0, std)


def test_weights_convert_both_ways_and_compute_the_same_experts():
    g = torch.Generator().manual_seed(0)
    E, D, F_ = 3, 8, 5
    w1, w3, w2 = (
        torch.randn(E, D, F_, generator=g),
        torch.randn(E, D, F_, generator=g),
        torch.randn(E, F_, D, generator=g),
    )
    mb = to_megablocks(w1, w3, w2)
    assert {k: tuple(v.shape) for k, v in mb.items()} == {"w1": (E * F_, D), "v1": (E * F_, D), "w2": (E * F_, D)}
    back = from_megablocks(mb["w1"], mb["v1"], mb["w2"], E)
    for name, ours in (("w1_EDF", w1), ("w3_EDF", w3), ("w2_EFD", w2)):
        assert torch.equal(back[name], ours)
    x = torch.randn(4, D, generator=g)
    e = 1  # MegaBlocks' GLU on expert e's rows: silu(x w1_e^T) * (x v1_e^T) @ w2_e
    rows = slice(e * F_, (e + 1) * F_)
    theirs = (F.silu(x @ mb["w1"][rows].T) * (x @ mb["v1"][rows].T)) @ mb["w2"][rows]
    torch.testing.assert_close(theirs, (F.silu(x @ w1[e]) * (x @ w3[e])) @ w2[e])


def test_megablocks_is_refused_in_one_line_where_it_cannot_run(tmp_path):
    stages = "schedule.stages=[{name:a,steps:2},{name:b,steps:2,prune:true}]"
    cfg = compose_config(["moe.backend=megablocks"])  # composes; the device is checked where it is known
    with pytest.raises(ConfigError, match="^moe.backend=megablocks needs CUDA"):
        validate(cfg, cuda=False)
    if not torch.cuda.is_available():  # the command line knows it: one line, no traceback
        line = cli_config_error(tmp_path, "moe.backend=megablocks")
        assert line.startswith("config error: moe.backend=megablocks needs CUDA") and "allowed on this machine" in line
    capacity_stage = "schedule.stages=[{name:a,steps:2,moe:{capacity_factor:1.25}}]"  # a stage's own capacity too
    for extra, problem in ((["moe.capacity_factor=1.25"], "dropless"), ([capacity_stage], "dropless"),
                           ([stages, "prune.keep=[6]"], "surgery"),
                           (["parallel.ep_size=2"], "parallel.ep_size=1 only")):  # fmt: skip
        with pytest.raises(ConfigError, match=problem):
            validate(compose_config(["moe.backend=megablocks", *extra]), cuda=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and MegaBlocks")
def test_the_megablocks_layer_equals_the_native_layer_on_a_gpu():
    """Same router, same expert weights (native draws converted): outputs, gradients and token counts."""
    pytest.importorskip("megablocks")
    from moetrain.backends.megablocks import MegaBlocksMoELayer
    from moetrain.model.moe import MoELayer
    from moetrain.surgery.experts import full_expert_stacks

    cfg, moe = ModelConfig(d_model=128, d_ff=256), MoEConfig(num_experts=8, top_k=2)
    torch.manual_seed(0)
    native = MoELayer(128, 256, moe).cuda().bfloat16()
    native.reset_parameters(0.02, 0.02)
    mb = MegaBlocksMoELayer(cfg, moe, "bf16").cuda().bfloat16()
    mb.load_state_dict({k: v for k, v in native.state_dict().items() if not k.startswith("experts.")}, strict=False)
    with torch.no_grad():
        for name, value in to_megablocks(*full_expert_stacks(native).values()).items():
            getattr(mb.mlp.mlp, name).copy_(value)
    x = torch.randn(2, 64, 128, device="cuda", dtype=torch.bfloat16)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, sa = native(xa)
    yb, sb = mb(xb)
    torch.testing.assert_close(yb.float(), ya.float(), rtol=3e-2, atol=3e-2)
    assert torch.equal(sa.tokens_per_expert_E, sb.tokens_per_expert_E)
    (ya.float().square().sum()).backward()
    (yb.float().square().sum()).backward()
    torch.testing.assert_close(xb.grad.float(), xa.grad.float(), rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(mb.router.weight_ED.grad.float(), native.router.weight_ED.grad.float(), rtol=5e-2,
                               atol=5e-2)  # fmt: skip
