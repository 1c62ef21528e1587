"""prune.mode=mone (MoNE): a cut expert becomes its mean output on the calibration tokens, still routed to and
scaled by its gate. The layer after the change equals a per-token float64 reference built from the original
weights; an expert whose output was constant changes nothing; the structure rebuilds from ``moe.expert_ids``; the
native export keeps the constants and a Hugging Face export refuses them in one line."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers.configs import assert_config_error
from helpers.moe_reference import reference_choices, swiglu
from test_pruning import tiny_model

from moetrain.config import ConfigError, ModelConfig, MoEConfig
from moetrain.interop.export import export_model, load_exported
from moetrain.interop.hf.api import save_hf
from moetrain.model import build_model
from moetrain.surgery.experts import constant_model
from moetrain.surgery.merging import expert_mean_outputs

KEEP = [[0, 2], [1, 3]]  # per MoE layer: experts 1, 3 (layer 0) and 0, 2 (layer 1) become constants


def layer_ids(keep: list[list[int]], experts: int = 4) -> list[list[int]]:
    """``moe.expert_ids`` after the change: the kept experts, then the constants written -(e + 1)."""
    return [[*k, *(-(e + 1) for e in range(experts) if e not in k)] for k in keep]


def calibration() -> list[tuple[torch.Tensor, None]]:
    return [(torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(s)), None) for s in range(3)]


def with_constants(model, keep=KEEP):
    means = expert_mean_outputs(model, model, calibration())
    moe = MoEConfig(num_experts=4, top_k=2)
    constant_model(model, moe, keep, means, layer_ids(keep), None)
    return means


def layer_inputs(model, x_BS: torch.Tensor) -> list[torch.Tensor]:
    seen = []
    hooks = [core_block.ffn.register_forward_pre_hook(lambda _m, a: seen.append(a[0].flatten(0, 1).clone()))
             for core_block in model.layers]  # fmt: skip
    with torch.no_grad():
        model(x_BS)
    for h in hooks:
        h.remove()
    return seen


def test_a_constant_expert_answers_its_mean_output_scaled_by_its_gate():
    model = tiny_model().eval()
    original = [{k: v.detach().double().clone() for k, v in block.ffn.state_dict().items()} for block in model.layers]
    means = with_constants(model)
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(9))
    inputs = layer_inputs(model, x)
    for j, (block, w, x_TD, keep) in enumerate(zip(model.layers, original, inputs, KEEP)):
        core = block.ffn
        assert core.num_constants == 2 and core.experts.w1_EDF.shape[0] == 2 and core.router.weight_ED.shape[0] == 4
        with torch.no_grad():
            got, stats = core(x_TD[None])
        # the reference: the original router and experts, one token and one choice at a time, in float64
        choices, _, _ = reference_choices(x_TD.double(), w["router.weight_ED"], top_k=2)
        want = torch.zeros_like(x_TD, dtype=torch.float64)
        for t, chosen in enumerate(choices):
            for e, gate in chosen:
                if e in keep:
                    w1, w3, w2 = (w[f"experts.{n}"][e] for n in ("w1_EDF", "w3_EDF", "w2_EFD"))
                    want[t] += gate * swiglu(x_TD[t].double(), w1, w3, w2)
                else:
                    want[t] += gate * means[j][e].double()
        torch.testing.assert_close(got[0].double(), want, rtol=1e-4, atol=1e-5)
        constant_assignments = sum(1 for chosen in choices for e, _ in chosen if e not in keep)
        assert 0 < constant_assignments < 2 * len(choices)  # both kinds are picked
        assert stats.dropped == 0 and int(stats.tokens_per_expert_E.sum()) == 2 * len(choices) - constant_assignments


def test_an_expert_with_constant_output_becomes_a_constant_without_changing_the_model():
    model = tiny_model().eval()
    with torch.no_grad():
        for block in model.layers:  # expert 1 of every layer outputs 0 for every input: a constant
            block.ffn.experts.w2_EFD[1].zero_()
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        before = model(x).logits_BSV
    with_constants(model, keep=[[0, 2, 3], [0, 2, 3]])
    with torch.no_grad():
        after = model(x).logits_BSV
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_the_structure_rebuilds_from_expert_ids_and_the_native_export_keeps_the_constants(tmp_path):
    model = tiny_model().eval()
    with_constants(model)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, vocab_size=300, seq_len=16)
    moe = MoEConfig(num_experts=4, top_k=2, expert_ids=layer_ids(KEEP))
    rebuilt = build_model(cfg, moe).eval()
    rebuilt.load_state_dict(model.state_dict())  # a checkpoint's load: strict, same names and shapes
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(9))
    exported, _, moe_out = load_exported(export_model(model, cfg, moe, tmp_path / "export", True))
    assert moe_out.expert_ids == layer_ids(KEEP)
    with torch.no_grad():
        want = model(x).logits_BSV
        torch.testing.assert_close(rebuilt(x).logits_BSV, want)
        torch.testing.assert_close(exported(x).logits_BSV, want)
    with pytest.raises(ConfigError, match=r"^prune.mode=mone: MoNE constants .* cannot be exported"):
        save_hf(model, replace(cfg, init_from=None), moe, tmp_path / "hf", family="mixtral")


def test_mone_is_refused_where_constants_cannot_go():
    stages = "schedule.stages=[{name:a,steps:2},{name:b,steps:2,prune:true}]"
    base = ["prune.mode=mone", stages, "prune.keep=[6]", "moe.capacity_factor=null", "moe.eval_capacity_factor=null"]
    assert_config_error([*base, "moe.backend=deepspeed"], "prune.mode=mone", "needs moe.backend=native")
    assert_config_error([*base[:2], "prune.keep=[6]", "moe.capacity_factor=1.25"], "prune.mode=mone", "dropless")
    two = "schedule.stages=[{name:a,steps:2,prune:true},{name:b,steps:2,prune:true}]"
    assert_config_error([base[0], two, "prune.keep=[6,4]", *base[3:]], "prune.mode=mone", "one pruning stage")
    refused = "export.hf=true cannot write prune.mode=mone's constants"
    assert_config_error(["+recipe=compress", "export.family=mixtral", "prune.mode=mone"], refused, "export.hf=false")
