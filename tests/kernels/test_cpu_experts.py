"""The CPU expert kernel (moe.expert_impl=cpu_kernel) against autograd through plain PyTorch ops.

Counts include empty experts and one expert holding most rows; 1 and 2 threads cover both the
single-run path (every GEMM multi-threaded) and the split of experts across cores.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from helpers.moe_reference import reference_combine, swiglu

from moetrain.kernels import expert_kernel, prepare_process, registry
from moetrain.kernels.cpu import experts as cpu_experts
from moetrain.kernels.cpu import runtime as cpu_runtime
from moetrain.model.dispatch import combine, permute
from moetrain.model.experts import GroupedExperts

D, FF = 16, 24
COUNTS = [[3, 0, 5, 7, 1, 0, 4, 2], [6], [0, 9], [0, 0, 0, 40, 1, 0]]


def naive_experts(x_SD, w1_EDF, w3_EDF, w2_EFD, counts):
    """Independent reference: one expert at a time through autograd (moe_reference's SwiGLU)."""
    rows = torch.split(x_SD, counts)
    return torch.cat([swiglu(x_e, w1_EDF[e], w3_EDF[e], w2_EFD[e]) for e, x_e in enumerate(rows)])


def test_builds_use_the_environments_ninja(monkeypatch, tmp_path):
    """The environment's ninja goes first on PATH (once), so every launch builds with the same ninja."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ninja").write_text("#!/bin/sh\n")
    (bin_dir / "ninja").chmod(0o755)
    monkeypatch.setattr(cpu_experts.sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    cpu_experts.use_environment_ninja()
    cpu_experts.use_environment_ninja()
    assert os.environ["PATH"] == f"{bin_dir}:/usr/bin:/bin"
    (bin_dir / "ninja").unlink()
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    cpu_experts.use_environment_ninja()  # no ninja in the environment: PATH stays as it is
    assert os.environ["PATH"] == "/usr/bin:/bin"


def test_kernel_builds_here():
    assert cpu_experts.fused_kernel_available(), "the CPU expert kernel must build on CPU machines (needs g++)"


@pytest.mark.parametrize("counts", COUNTS, ids=lambda c: f"E{len(c)}")
def test_fused_gradcheck_fp64(counts, threads):
    E = len(counts)
    x = torch.randn(sum(counts), D, dtype=torch.float64, requires_grad=True)
    w1, w3 = (torch.randn(E, D, FF, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w2 = torch.randn(E, FF, D, dtype=torch.float64, requires_grad=True)
    count_E = torch.tensor(counts)
    assert torch.autograd.gradcheck(
        lambda *a: cpu_experts.FusedSwiGLUExperts.apply(*a, count_E), (x, w1, w3, w2), eps=1e-6, atol=1e-5
    )
    if threads == 2 and len(counts) == 8:  # this case takes the experts-across-cores path at 2 threads
        assert 2 * max(counts) <= sum(counts) and len(counts) >= 4


@pytest.mark.parametrize("counts", COUNTS, ids=lambda c: f"E{len(c)}")
@pytest.mark.parametrize("impl", ["cpu_kernel", "grouped_mm", "loop"])
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


def random_experts(counts, dtype=torch.float32):
    E = len(counts)
    x = torch.randn(sum(counts), D, dtype=dtype)
    w1, w3 = (0.3 * torch.randn(E, D, FF, dtype=dtype) for _ in range(2))
    return x, w1, w3, 0.3 * torch.randn(E, FF, D, dtype=dtype)


def test_frozen_experts_skip_their_weight_gemms(threads):
    """LoRA stages freeze the experts: no weight gradient is computed, the input gradient is exact."""
    counts = COUNTS[0]
    x, w1, w3, w2 = random_experts(counts)
    kernel = cpu_experts._build()
    _, h1, h3 = kernel.swiglu_forward(x, w1, w3, w2, counts)
    dy = torch.randn(sum(counts), D)
    dx, dw1, dw3, dw2 = kernel.swiglu_backward(dy, x, w1, w3, w2, h1, h3, counts, True, False, False, False)
    assert dw1 is None and dw3 is None and dw2 is None
    x_ref = x.clone().requires_grad_(True)
    (dx_ref,) = torch.autograd.grad(naive_experts(x_ref, w1, w3, w2, counts), x_ref, dy)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)


def test_strided_weights_bf16_and_inference_mode(threads):
    """Weights as transposed views (what a parametrisation such as peft's can hand over), bfloat16, and a
    forward under torch.inference_mode (worker threads must run in the caller's mode)."""
    counts = COUNTS[0]
    x, w1, w3, w2 = random_experts(counts)
    w1_strided = w1.transpose(1, 2).contiguous().transpose(1, 2)
    assert not w1_strided.is_contiguous()
    count_E = torch.tensor(counts)
    ref = naive_experts(x, w1, w3, w2, counts)
    torch.testing.assert_close(cpu_experts.FusedSwiGLUExperts.apply(x, w1_strided, w3, w2, count_E), ref)
    with torch.inference_mode():
        torch.testing.assert_close(cpu_experts.FusedSwiGLUExperts.apply(x, w1, w3, w2, count_E), ref)
    bf16 = [t.to(torch.bfloat16).requires_grad_(True) for t in (x, w1, w3, w2)]
    y = cpu_experts.FusedSwiGLUExperts.apply(*bf16, count_E)
    grads = torch.autograd.grad(y, bf16, torch.ones_like(y))
    ref32 = [t.detach().float().requires_grad_(True) for t in bf16]
    y32 = naive_experts(*ref32, counts)
    grads32 = torch.autograd.grad(y32, ref32, torch.ones_like(y32))
    torch.testing.assert_close(y.float(), y32, rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, grads32):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), r, rtol=5e-2, atol=5e-2)


def test_double_backward_is_refused():
    counts = COUNTS[0]
    x, w1, w3, w2 = (t.requires_grad_(True) for t in random_experts(counts))
    y = cpu_experts.FusedSwiGLUExperts.apply(x, w1, w3, w2, torch.tensor(counts))
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.sum().backward()


def test_auto_picks_aten_on_cpu_and_the_kernel_elsewhere_is_an_error():
    cpu = torch.device("cpu")
    assert expert_kernel("auto", cpu, torch.float32).name == "grouped_mm"
    assert expert_kernel("auto", cpu, torch.float16).name == "loop"  # not a _grouped_mm dtype
    assert expert_kernel("cpu_kernel", cpu, torch.float32).name == "cpu_kernel"
    with pytest.raises(ValueError, match="moe.expert_impl=cpu_kernel runs on CPU tensors"):
        expert_kernel("cpu_kernel", cpu, torch.float16)


@pytest.mark.parametrize(("d", "ff", "grouped"), [(D, FF, True), (6, 10, False)], ids=["aligned", "unaligned"])
def test_auto_takes_the_loop_where_grouped_mm_cannot_read_the_rows(monkeypatch, d, ff, grouped):
    """fp32 rows of 6 or 10 elements (24 / 40 bytes) are not the 16-byte aligned rows torch._grouped_mm needs:
    auto runs those experts on the loop; both ways equal the naive loop."""
    calls = []
    real_grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real_grouped_mm(*a, **kw))
    counts = COUNTS[0]
    with torch.random.fork_rng():  # seeded, and the global RNG stream of the tests after it stays as it was
        torch.manual_seed(0)
        experts = GroupedExperts(len(counts), d, ff, "auto")
        for p in experts.parameters():
            torch.nn.init.normal_(p, std=0.3)
        x = torch.randn(sum(counts), d)
    y = experts(x, torch.tensor(counts))
    assert (len(calls) > 0) == grouped
    with torch.no_grad():
        torch.testing.assert_close(y, naive_experts(x, *experts.parameters(), counts), rtol=1e-5, atol=1e-5)


def test_without_a_compiler_auto_runs_and_the_kernel_is_refused_in_one_line(monkeypatch, caplog):
    def no_compiler():
        raise RuntimeError("no C++ compiler")

    counts = COUNTS[0]
    monkeypatch.setattr(cpu_experts, "_build", no_compiler)
    caches = (cpu_experts.fused_kernel_available, cpu_experts.build_error, registry._cpu_kernel)
    for cache in caches:
        cache.cache_clear()
    try:
        experts = GroupedExperts(len(counts), D, FF, "auto")
        for p in experts.parameters():
            torch.nn.init.normal_(p, std=0.3)
        x = torch.randn(sum(counts), D)
        y = experts(x, torch.tensor(counts))  # auto never builds the kernel
        with torch.no_grad():
            torch.testing.assert_close(y, naive_experts(x, *experts.parameters(), counts), rtol=1e-5, atol=1e-5)
        with caplog.at_level(logging.WARNING, logger=cpu_experts.__name__):
            with pytest.raises(ValueError, match=r"^moe.expert_impl=cpu_kernel: the CPU expert kernel does not build"):
                GroupedExperts(len(counts), D, FF, "cpu_kernel")(x, torch.tensor(counts))
        assert "did not build: no C++ compiler" in caplog.text
    finally:
        for cache in caches:
            cache.cache_clear()


@pytest.mark.parametrize(
    ("impl", "builds"), [("auto", False), ("cpu_kernel", True), ("grouped_mm", False), ("loop", False)]
)
def test_the_kernel_is_built_before_training_only_where_it_runs(monkeypatch, impl, builds):
    calls = []
    monkeypatch.setattr(cpu_runtime, "configure_from_environment", lambda *a: calls.append("configure"))
    monkeypatch.setattr(cpu_experts, "fused_kernel_available", lambda: calls.append("build") or True)
    monkeypatch.setattr(cpu_experts, "build_error", lambda: calls.append("build") or None)
    prepare_process(impl, None, 1, 0, lambda: calls.append("barrier"))
    assert calls == (["configure", "build", "barrier", "build"] if builds else ["configure"])


# ---------------------------------------------------------------- the token-level kernel (gather + combine)
def token_routing(T, E, K, drop_fraction, seed=0):
    """Each token picks K distinct experts; some assignments are dropped (capacity); ``permute`` sorts the rest."""
    gen = torch.Generator().manual_seed(seed)
    expert_idx_TK = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    keep_TK = torch.rand(T, K, generator=gen) >= drop_fraction
    return expert_idx_TK, keep_TK, permute(expert_idx_TK, E, keep_TK)


def naive_token_moe(x_TD, gates_TK, expert_idx_TK, keep_TK, w1, w3, w2):
    """Independent reference, one token at a time (moe_reference): out[t] = sum over kept k of
    gates[t, k] * SwiGLU_e(x[t])."""
    T, K = expert_idx_TK.shape
    placed = {(t, k): int(expert_idx_TK[t, k]) for t in range(T) for k in range(K) if keep_TK[t, k]}
    return reference_combine(x_TD, gates_TK, placed, w1, w3, w2)[0]


def fused_experts_and_inputs(E: int, d: int, ff: int, T: int, K: int, std: float):
    """Kernel experts with N(0, std) weights, and x, gates (both needing gradients) and dout for T tokens."""
    experts = GroupedExperts(E, d, ff, "cpu_kernel")
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=std)
    return experts, torch.randn(T, d, requires_grad=True), torch.rand(T, K, requires_grad=True), torch.randn(T, d)


@pytest.mark.parametrize(("K", "drop"), [(1, 0.0), (2, 0.0), (2, 0.3), (3, 0.5)])
def test_token_kernel_gradcheck_fp64(K, drop, threads):
    E, T = 8, 24
    expert_idx_TK, keep_TK, perm = token_routing(T, E, K, drop)
    _, w1, w3, w2 = (t.requires_grad_(True) for t in random_experts([3] * E, torch.float64))
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(T, K, dtype=torch.float64, requires_grad=True)

    def fused(*a):
        return cpu_experts.FusedMoEExperts.apply(*a, perm.assignment_A, perm.tokens_per_expert_E)[0]

    # fast mode checks random vector-Jacobian products (the full Jacobian has ~10k columns here)
    assert torch.autograd.gradcheck(fused, (x, gates, w1, w3, w2), eps=1e-6, atol=1e-5, fast_mode=True)
    ref = naive_token_moe(x, gates, expert_idx_TK, keep_TK, w1, w3, w2)
    torch.testing.assert_close(fused(x, gates, w1, w3, w2), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize(("T", "d"), [(64, D), (300, 20)], ids=["T64-D16", "T300-D20"])
def test_token_kernel_equals_gather_experts_combine(K, T, d, threads):
    """Same arithmetic as the unfused path (gather, experts, dispatch.combine): the output is bit for bit the
    same at K <= 2 (two terms add in either order alike); gradients agree to fp32 rounding. T = 300 spreads
    the per-token sums over both threads; D = 20 leaves a tail after the 16-lane dot product of the gate
    gradient."""
    E = 8
    expert_idx_TK, keep_TK, perm = token_routing(T, E, K, 0.2)
    experts, x, gates, dout = fused_experts_and_inputs(E, d, FF, T, K, std=0.3)
    out, y = experts(x, perm.tokens_per_expert_E, perm=perm, gates_TK=gates)
    y_ref = experts(x.index_select(0, perm.token_A), perm.tokens_per_expert_E)
    out_ref = combine(y_ref, perm, gates, T)
    if K <= 2:
        assert torch.equal(out, out_ref) and torch.equal(y, y_ref)
    torch.testing.assert_close(out, out_ref)
    inputs = [x, gates, *experts.parameters()]
    grads = torch.autograd.grad(out, inputs, dout)
    for name, g, r in zip(["x", "gates", "w1", "w3", "w2"], grads, torch.autograd.grad(out_ref, inputs, dout)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")
    dropped = ~keep_TK
    assert dropped.any() and grads[1][dropped].eq(0).all()


def test_token_kernel_input_without_grad(threads):
    """x needs no gradient (e.g. the first layer's input) while the experts train: the weight gradients are
    still exact and x's is not computed."""
    E, T, K = 8, 40, 2
    expert_idx_TK, keep_TK, perm = token_routing(T, E, K, 0.2)
    _, w1, w3, w2 = (t.requires_grad_(True) for t in random_experts([5] * E))
    x, gates = torch.randn(T, D), torch.rand(T, K)
    out, _ = cpu_experts.FusedMoEExperts.apply(x, gates, w1, w3, w2, perm.assignment_A, perm.tokens_per_expert_E)
    ref = naive_token_moe(x, gates, expert_idx_TK, keep_TK, w1, w3, w2)
    dout = torch.randn(T, D)
    for g, r in zip(torch.autograd.grad(out, [w1, w3, w2], dout), torch.autograd.grad(ref, [w1, w3, w2], dout)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_token_kernel_frozen_experts_bf16_and_inference_mode(threads):
    """Frozen experts (a LoRA stage): only x and the gates get gradients; bfloat16 tracks float32; a forward
    under torch.inference_mode runs on both threads."""
    E, T, K = 8, 40, 2
    expert_idx_TK, keep_TK, perm = token_routing(T, E, K, 0.2)
    _, w1, w3, w2 = random_experts([5] * E)
    x = torch.randn(T, D, requires_grad=True)
    gates = torch.rand(T, K, requires_grad=True)
    args = (perm.assignment_A, perm.tokens_per_expert_E)
    out, _ = cpu_experts.FusedMoEExperts.apply(x, gates, w1, w3, w2, *args)
    ref = naive_token_moe(x, gates, expert_idx_TK, keep_TK, w1, w3, w2)
    dout = torch.randn(T, D)
    for g, r in zip(torch.autograd.grad(out, [x, gates], dout), torch.autograd.grad(ref, [x, gates], dout)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(cpu_experts.FusedMoEExperts.apply(x, gates, w1, w3, w2, *args)[0], ref)
    bf16 = [t.detach().to(torch.bfloat16).requires_grad_(True) for t in (x, w1, w3, w2)]
    out16, _ = cpu_experts.FusedMoEExperts.apply(bf16[0], gates, *bf16[1:], *args)
    assert out16.dtype == torch.bfloat16
    grads16 = torch.autograd.grad(out16, [*bf16, gates], dout.to(torch.bfloat16))
    ref32 = [t.detach().float().requires_grad_(True) for t in bf16]
    out32 = naive_token_moe(ref32[0], gates, expert_idx_TK, keep_TK, *ref32[1:])
    grads32 = torch.autograd.grad(out32, [*ref32, gates], dout)
    torch.testing.assert_close(out16.float(), out32, rtol=2e-2, atol=2e-2)
    for g, r in zip(grads16, grads32):
        torch.testing.assert_close(g.float(), r, rtol=5e-2, atol=5e-2)
