"""The native MoE layer on a CUDA GPU against the per-token float64 loop on CPU (marked gpu: skipped without CUDA).

What runs there: fp32 experts on ``moe.expert_impl=loop`` (one GEMM per expert), bfloat16 experts on
``torch._grouped_mm`` (``grouped_mm``, and ``auto``, which picks it on sm90+), DeepSpeed's Triton grouped GEMM
(``triton``) in fp32, bf16 and fp16, the router in fp32 either way. The
same cases run on CPU as well (``auto`` excepted: on CPU it is the CPU kernel, tested in test_cpu_experts.py), so
that the test itself is checked where CI runs.
"""

from __future__ import annotations

import pytest
import torch
from helpers.moe_reference import assert_close, params64, run_reference

from moetrain.config import MoEConfig
from moetrain.model.dispatch import expert_capacity
from moetrain.model.moe import MoELayer

D, F, E, T = 16, 32, 8, 64  # bfloat16 rows of 16 and 32 elements: the 16-byte strides torch._grouped_mm needs
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# (device, dtype, moe.expert_impl, tolerance relative to the largest reference entry)
PATHS = [
    ("cpu", torch.float32, "loop", 1e-4),
    ("cpu", torch.bfloat16, "grouped_mm", 3e-2),
    pytest.param("cuda", torch.float32, "loop", 1e-4, marks=GPU),
    pytest.param("cuda", torch.bfloat16, "grouped_mm", 3e-2, marks=GPU),
    pytest.param("cuda", torch.bfloat16, "auto", 3e-2, marks=GPU),
    # DeepSpeed's Triton grouped GEMM (what auto runs where torch._grouped_mm has no fused kernel)
    pytest.param("cuda", torch.float32, "triton", 1e-3, marks=GPU),
    pytest.param("cuda", torch.bfloat16, "triton", 3e-2, marks=GPU),
    pytest.param("cuda", torch.float16, "triton", 3e-2, marks=GPU),
]
CASES = [(1, None, "probs"), (2, None, "probs"), (2, 0.5, "position"), (2, 1.0, "reroute"), (4, 0.5, "probs")]


@pytest.mark.parametrize(("device", "dtype", "grouped_mm", "tol"), PATHS)
@pytest.mark.parametrize(("top_k", "capacity_factor", "policy"), CASES)
def test_layer_on_device_matches_per_token_reference(
    device, dtype, grouped_mm, tol, top_k, capacity_factor, policy, monkeypatch
):
    if device == "cuda" and grouped_mm in ("grouped_mm", "auto") and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("torch._grouped_mm on CUDA needs sm90 or newer")
    calls = []
    real_grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real_grouped_mm(*a, **kw))

    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=E,
        top_k=top_k,
        capacity_factor=capacity_factor,
        drop_policy=policy,
        min_capacity=1,
        expert_impl=grouped_mm,
    )
    layer = MoELayer(D, F, cfg)
    layer.reset_parameters(0.5, 0.5)
    layer = layer.to(device, dtype)
    x = torch.randn(2, T // 2, D).to(device, dtype).requires_grad_(True)
    upstream = torch.randn(2, T // 2, D).to(device, dtype)
    y, stats = layer(x)
    (y.float() * upstream.float()).sum().backward()
    assert (len(calls) > 0) == (grouped_mm in ("grouped_mm", "auto")), "the expert path asked for ran"

    # the reference: the same (rounded) weights and tokens in float64, one token at a time
    p64 = params64(layer)
    x64 = x.detach().double().cpu().reshape(T, D).requires_grad_(True)
    capacity = expert_capacity(T, E, top_k, capacity_factor, cfg.min_capacity)
    y_ref, _, placed, _, _ = run_reference(layer, x64, p64, capacity)
    (y_ref * upstream.double().cpu().reshape(T, D)).sum().backward()

    assert_close(y.reshape(T, D), y_ref.detach(), "output", tol)
    assert_close(x.grad.reshape(T, D), x64.grad, "grad x", tol)
    for name, p in layer.named_parameters():
        assert_close(p.grad, p64[name].grad, f"grad {name}", tol)
    assert stats.dropped == T * top_k - len(placed)
    assert int(stats.tokens_per_expert_E.sum()) == len(placed)
