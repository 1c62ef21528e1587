"""The expert FFN on ATen (``torch._grouped_mm`` and the per-expert loop) against autograd through a naive
per-expert loop, and the seam's choice of implementation (moetrain/kernels/registry.py).

Counts include empty experts and one expert holding most rows; 1 and 2 threads.
"""

from __future__ import annotations

import logging

import pytest
import torch
from helpers.moe_reference import swiglu

from moetrain.kernels import aten, expert_kernel, registry, triton
from moetrain.model.experts import GroupedExperts

D, FF = 16, 24
COUNTS = [[3, 0, 5, 7, 1, 0, 4, 2], [6], [0, 9], [0, 0, 0, 40, 1, 0]]


def naive_experts(x_SD, w1_EDF, w3_EDF, w2_EFD, counts):
    """Independent reference: one expert at a time through autograd (moe_reference's SwiGLU)."""
    rows = torch.split(x_SD, counts)
    return torch.cat([swiglu(x_e, w1_EDF[e], w3_EDF[e], w2_EFD[e]) for e, x_e in enumerate(rows)])


def seeded_experts(counts: list[int], d: int, ff: int, impl: str) -> tuple[GroupedExperts, torch.Tensor]:
    """Experts with wide random weights and their rows, seeded; the global RNG stream of the tests after it
    stays as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        experts = GroupedExperts(len(counts), d, ff, impl)
        for p in experts.parameters():
            torch.nn.init.normal_(p, std=0.3)
        return experts, torch.randn(sum(counts), d)


@pytest.mark.parametrize("counts", COUNTS, ids=lambda c: f"E{len(c)}")
@pytest.mark.parametrize("impl", ["auto", "grouped_mm", "loop"])
def test_expert_paths_equal_naive_loop(counts, impl, threads):
    torch.manual_seed(0)
    experts = GroupedExperts(len(counts), D, FF, impl)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(sum(counts), D, requires_grad=True)
    dy = torch.randn(sum(counts), D)
    y = experts(x, torch.tensor(counts))
    grads = torch.autograd.grad(y, [x, *experts.parameters()], dy)
    ref = naive_experts(x, *experts.parameters(), counts)
    ref_grads = torch.autograd.grad(ref, [x, *experts.parameters()], dy)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(["x", "w1", "w3", "w2"], grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


def test_auto_picks_grouped_mm_where_it_runs_else_the_loop_and_says_why_once(caplog):
    cpu = torch.device("cpu")
    assert expert_kernel("auto", cpu, torch.float32).name == "grouped_mm"
    assert expert_kernel("auto", cpu, torch.bfloat16).name == "grouped_mm"
    registry._warned.clear()
    with caplog.at_level(logging.WARNING, logger="moetrain"):
        assert expert_kernel("auto", cpu, torch.float16).name == "loop"  # not a _grouped_mm dtype on CPU
        assert expert_kernel("auto", cpu, torch.float16).name == "loop"
    assert [r.getMessage() for r in caplog.records] == [
        "moe.expert_impl=auto: one GEMM per expert on cpu torch.float16 (torch._grouped_mm has no kernel for it)"
    ]
    assert expert_kernel("auto", cpu, torch.float64).name == "loop"
    assert expert_kernel("loop", cpu, torch.float32).name == "loop"
    assert expert_kernel("triton", cpu, torch.float32).name == "triton"  # forced (the config refuses it on CPU)


def test_auto_on_a_cuda_gpu_without_grouped_mm_takes_the_triton_gemm_else_the_loop(monkeypatch, caplog):
    """An sm80 GPU or fp16/fp32 (no fused torch._grouped_mm): DeepSpeed's Triton grouped GEMM when it can run,
    else the loop with the reason; the devices are made up here, nothing runs on them."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(aten, "grouped_mm_runs_on", lambda device, dtype: False)
    monkeypatch.setattr(triton, "triton_unavailable", lambda: None)
    assert expert_kernel("auto", cuda, torch.float16).name == "triton"
    monkeypatch.setattr(triton, "triton_unavailable", lambda: "no Triton driver")
    registry._warned.clear()
    with caplog.at_level(logging.WARNING, logger="moetrain"):
        assert expert_kernel("auto", cuda, torch.float32).name == "loop"
    assert caplog.records[0].getMessage().endswith("DeepSpeed's Triton grouped GEMM cannot run: no Triton driver)")


def test_the_triton_path_hands_deepspeed_the_offsets_torch_grouped_mm_takes(monkeypatch):
    """The Triton kernel's wiring with its GEMM replaced by torch._grouped_mm (same contract: 2D x 3D, int32
    cumulative offsets): the experts equal the naive loop. The kernel itself runs only on a GPU (test_cuda_moe)."""
    import importlib

    ds = importlib.import_module("deepspeed.ops.triton_ops.group_gemm_triton")  # the package's name is a function

    seen = []
    monkeypatch.setattr(
        ds, "group_gemm_triton", lambda a, b, offs: seen.append(offs) or torch._grouped_mm(a, b, offs=offs)
    )
    counts = COUNTS[0]
    experts, x = seeded_experts(counts, D, FF, "triton")
    y = experts(x, torch.tensor(counts))
    assert (
        len(seen) == 3 and seen[0].dtype == torch.int32 and seen[0].tolist() == torch.tensor(counts).cumsum(0).tolist()
    )
    with torch.no_grad():
        torch.testing.assert_close(y, naive_experts(x, *experts.parameters(), counts), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("d", "ff", "grouped"), [(D, FF, True), (6, 10, False)], ids=["aligned", "unaligned"])
def test_auto_takes_the_loop_where_grouped_mm_cannot_read_the_rows(monkeypatch, d, ff, grouped):
    """fp32 rows of 6 or 10 elements (24 / 40 bytes) are not the 16-byte aligned rows torch._grouped_mm needs:
    auto runs those experts on the loop; both ways equal the naive loop."""
    calls = []
    real_grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real_grouped_mm(*a, **kw))
    counts = COUNTS[0]
    experts, x = seeded_experts(counts, d, ff, "auto")
    y = experts(x, torch.tensor(counts))
    assert (len(calls) > 0) == grouped
    with torch.no_grad():
        torch.testing.assert_close(y, naive_experts(x, *experts.parameters(), counts), rtol=1e-5, atol=1e-5)


def test_bf16_experts_follow_the_fp32_reference(threads):
    """bfloat16 on the grouped GEMM: outputs and gradients within bf16 rounding of the fp32 naive loop."""
    counts = COUNTS[0]
    with torch.random.fork_rng():
        torch.manual_seed(1)
        experts = GroupedExperts(len(counts), D, FF, "auto").to(torch.bfloat16)
        for p in experts.parameters():
            torch.nn.init.normal_(p, std=0.3)
        x = torch.randn(sum(counts), D, dtype=torch.bfloat16, requires_grad=True)
    y = experts(x, torch.tensor(counts))
    grads = torch.autograd.grad(y, [x, *experts.parameters()], torch.ones_like(y))
    ref32 = [t.detach().float().requires_grad_(True) for t in (x, *experts.parameters())]
    y32 = naive_experts(*ref32, counts)
    grads32 = torch.autograd.grad(y32, ref32, torch.ones_like(y32))
    torch.testing.assert_close(y.float(), y32, rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, grads32):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), r, rtol=5e-2, atol=5e-2)
