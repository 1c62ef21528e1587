"""The CPU kernel's own parts: its fp32 GEMM (csrc/f32_gemm.cpp), the router's logits GEMM on it, and SwiGLU's
elementwise passes (csrc/f32_swiglu.cpp), against float64 and against ATen's GEMMs (moved out of
test_cpu_experts.py, which holds the expert FFN entries)."""

from __future__ import annotations

import pytest
import torch
from helpers.cpu_features import cpu_has_avx512, needs_avx512, on_thread_counts
from test_cpu_experts import D, fused_experts_and_inputs, random_experts

from moetrain.config import MoEConfig
from moetrain.kernels.cpu import experts as cpu_experts
from moetrain.model.dispatch import permute


# ---------------------------------------------------------------- the kernel's own fp32 GEMM (csrc/f32_gemm.cpp)
def test_own_gemm_runs_exactly_where_the_cpu_has_avx512():
    assert cpu_experts.f32_gemm_active() == cpu_has_avx512()
    with cpu_experts.aten_gemms():
        assert not cpu_experts.f32_gemm_active()
    assert cpu_experts.f32_gemm_active() == cpu_has_avx512()


def operand(rows: int, cols: int, layout: str) -> torch.Tensor:
    """A (rows, cols) float32 matrix laid out as asked: contiguous, a transposed view, every other column of a
    wider matrix (any strides are allowed for A), or rows padded (row stride > cols)."""
    if layout == "transposed":
        return torch.randn(cols, rows).t()
    if layout == "every-other-column":
        return torch.randn(rows, 2 * cols)[:, ::2]
    if layout == "padded-rows":
        return torch.randn(rows, cols + 5)[:, :cols]
    return torch.randn(rows, cols)


@needs_avx512
@pytest.mark.parametrize(
    ("M", "N", "K"),
    # one expert's forward (64 rows), an M edge, A streaming with N edges of every width, K = 0 and 1-element,
    # K over one pass (512) and B streaming over more than one chunk of rows (192); right edges of 1-8 columns past
    # 16, 32 and 48 (their last vector is 8 lanes wide) with A or B streaming
    [
        (200, 24, 70),
        (20, 40, 9),
        (130, 49, 300),
        (70, 120, 600),
        (64, 512, 256),
        (70, 256, 512),
        (512, 70, 256),
        (256, 27, 512),
        (512, 16, 33),
        (600, 130, 7),
        (7, 16, 0),
        (1, 1, 1),
        (25, 1, 3),
        (256, 512, 64),
        (70, 96, 1100),
        (300, 520, 40),
    ],
)
@pytest.mark.parametrize("a_layout", ["contiguous", "transposed", "every-other-column"])
@pytest.mark.parametrize("store", ["write", "add", "stream"])
def test_own_gemm_equals_a_float64_product(M, N, K, a_layout, store):
    torch.manual_seed(M * 1000 + N + K)
    kernel = cpu_experts._build()
    a, b = operand(M, K, a_layout), operand(K, N, "padded-rows")
    c = operand(M, N, "padded-rows" if store != "stream" else "contiguous")
    before = c.clone()
    kernel.f32_mm(c, a, b, store == "add", store == "stream")
    ref = a.double() @ b.double() + (before.double() if store == "add" else 0)
    torch.testing.assert_close(c.double(), ref, rtol=1e-5, atol=1e-5 * max(K, 1) ** 0.5)


@needs_avx512
@pytest.mark.parametrize(("rows", "cols"), [(16, 16), (64, 512), (512, 64), (17, 33), (130, 70), (1, 5)])
def test_own_transpose_is_exact(rows, cols):
    kernel = cpu_experts._build()
    for t in (torch.randn(rows, cols), operand(rows, cols, "padded-rows")):
        assert torch.equal(kernel.f32_transpose(t), t.t().contiguous())


@needs_avx512
def test_own_gemm_gives_the_same_bits_on_any_number_of_threads():
    """Each output tile is summed by one thread in k order, so 1 and 2 threads agree bit for bit, for a lone GEMM
    (split over the threads by tiles) and for the kernel's single-expert path."""
    kernel = cpu_experts._build()
    a, b = torch.randn(300, 200), torch.randn(200, 260)
    x, w1, w3, w2 = random_experts([300])

    def gemm_and_expert():
        c = torch.empty(300, 260)
        kernel.f32_mm(c, a, b, False, False)
        return (c, *kernel.swiglu_forward(x, w1, w3, w2, [300]))

    for one, two in zip(*on_thread_counts(gemm_and_expert)):
        assert torch.equal(one, two)


@needs_avx512
def test_a_long_k_is_summed_in_the_same_passes_on_any_number_of_threads():
    """A K over 512 goes in passes chosen by K alone (of 256), so 1 and 2 threads still agree bit for bit."""
    kernel = cpu_experts._build()
    a, b = torch.randn(130, 1100), torch.randn(1100, 200)

    def gemm():
        c = torch.empty(130, 200)
        kernel.f32_mm(c, a, b, False, False)
        return c

    one, two = on_thread_counts(gemm)
    assert torch.equal(one, two)


@needs_avx512
def test_one_large_expert_splits_its_work_over_the_threads_alike():
    """One expert of 2000 rows runs outside a parallel region: its GEMM tiles, block transposes and SwiGLU
    gradient loop are split over the threads. 1 and 2 threads give the same bits, and both equal the same
    kernel on ATen's GEMMs to fp32 rounding (a wrong split would change the 2-thread result only)."""
    kernel = cpu_experts._build()
    E, D_, F_, S = 1, 64, 96, 2000
    x, dy = torch.randn(S, D_), torch.randn(S, D_)
    w1, w3 = (0.1 * torch.randn(E, D_, F_) for _ in range(2))
    w2 = 0.1 * torch.randn(E, F_, D_)

    def forward_backward():
        y, h1, h3 = kernel.swiglu_forward(x, w1, w3, w2, [S])
        return (y, *kernel.swiglu_backward(dy, x, w1, w3, w2, h1, h3, [S], True, True, True, True))

    runs = on_thread_counts(forward_backward)
    with cpu_experts.aten_gemms():
        (aten,) = on_thread_counts(forward_backward, (2,))
    for one, two, ref in zip(*runs, aten):
        assert torch.equal(one, two)
        # the weight gradients sum over all 2000 rows, in another order on ATen: rounding grows with sqrt(S)
        torch.testing.assert_close(two, ref, rtol=1e-5, atol=1e-5 * S**0.5)


@needs_avx512
@pytest.mark.parametrize(("d", "ff"), [(64, 128), (80, 100)], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("E", [6, 17])
def test_token_kernel_on_own_gemm_equals_it_on_aten_gemms(d, ff, E, threads):
    """The whole token-level kernel, forward and every gradient, on its own GEMM against ATen's (MKL), with
    experts of 0 to ~130 rows (every tile edge); 'unaligned' rows (d_ff 100) keep d_ff-wide weight gradients off
    the streaming stores. With 6 experts (~94 rows) the backward transposes the experts' weights, with 17 (~30
    rows) their row blocks (test_backward_transposes_give_the_same_bits forces each)."""
    perm, experts, run = token_kernel_case(E, d, ff)
    own = run()
    with cpu_experts.aten_gemms():
        aten = run()
    for name, o, r in zip(["out", "y", "x", "gates", "w1", "w3", "w2"], own, aten):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    counts = perm.tokens_per_expert_E.tolist()
    assert counts[-1] == 0  # an empty expert
    if E == 6:  # the others span two 64-column blocks
        assert min(counts[:-1]) > 64


def token_kernel_case(E: int, d: int, ff: int):
    """(perm, experts, run): 260 tokens with 2 experts each among the first E - 1 (the last expert gets no rows),
    10 % of the assignments dropped; run() returns the output, y and every gradient of the token-level kernel."""
    T, K = 260, 2
    gen = torch.Generator().manual_seed(0)
    expert_idx_TK = torch.stack([torch.randperm(E - 1, generator=gen)[:K] for _ in range(T)])
    perm = permute(expert_idx_TK, E, torch.rand(T, K, generator=gen) >= 0.1)
    experts, x, gates, dout = fused_experts_and_inputs(E, d, ff, T, K, std=0.1)
    inputs = [x, gates, *experts.parameters()]

    def run():
        out, y = experts(x, perm.tokens_per_expert_E, perm=perm, gates_TK=gates)
        return (out, y, *torch.autograd.grad(out, inputs, dout))

    return perm, experts, run


@needs_avx512
@pytest.mark.parametrize("E", [6, 17])
def test_backward_transposes_give_the_same_bits(E, threads):
    """The own-GEMM backward transposes either an expert's weights or its row blocks around the products with a
    transposed weight, whichever moves fewer elements; forced to each, every gradient is the same bits."""
    kernel = cpu_experts._build()
    _, _, run = token_kernel_case(E, 64, 128)
    results = {}
    for name, mode in (("smaller", 0), ("weights", 1), ("rows", 2)):
        before = kernel.set_backward_transposes(mode)
        try:
            results[name] = run()
        finally:
            kernel.set_backward_transposes(before)
    for name in ("weights", "rows"):
        for label, a, b in zip(["out", "y", "x", "gates", "w1", "w3", "w2"], results[name], results["smaller"]):
            assert torch.equal(a, b), f"{label} with the {name} transposed differs"
    with pytest.raises(RuntimeError, match="mode 0, 1 or 2"):
        kernel.set_backward_transposes(3)


# ---------------------------------------------------------------- the router's logits GEMM (cpu_experts.linear)
@needs_avx512
@pytest.mark.parametrize(("T", "d", "E"), [(4096, 256, 64), (300, 20, 8), (7, 33, 3)])
def test_router_linear_on_own_gemm_equals_a_float64_product(T, d, E):
    """``cpu_experts.linear`` runs x w^T and both gradients on the kernel's GEMM; each against float64, also
    with an upstream gradient of zero strides (what autograd hands over for a sum)."""
    torch.manual_seed(T + d + E)
    x, w = torch.randn(T, d, requires_grad=True), torch.randn(E, d, requires_grad=True)
    out = cpu_experts.linear(x, w)
    assert type(out.grad_fn).__name__ == "KernelLinearBackward"
    x64, w64 = (t.detach().double().requires_grad_(True) for t in (x, w))
    ref = x64 @ w64.t()
    for dout in (torch.randn(T, E), torch.ones(1, 1).expand(T, E)):
        dx, dw = torch.autograd.grad(out, [x, w], dout, retain_graph=True)
        dx64, dw64 = torch.autograd.grad(ref, [x64, w64], dout.double(), retain_graph=True)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * d**0.5)
        torch.testing.assert_close(dx.double(), dx64, rtol=1e-5, atol=1e-5 * E**0.5)
        torch.testing.assert_close(dw.double(), dw64, rtol=1e-5, atol=1e-5 * T**0.5)


def test_router_linear_falls_back_to_aten_off_the_kernel():
    x, w = torch.randn(5, 8, requires_grad=True), torch.randn(3, 8)
    with cpu_experts.aten_gemms():
        assert type(cpu_experts.linear(x, w).grad_fn).__name__ != "KernelLinearBackward"
    for other in (x.double(), x.t().contiguous().t()):  # not fp32, rows not contiguous
        assert not cpu_experts.kernel_linear_supported(other, w.to(other.dtype))


@pytest.mark.parametrize(
    ("impl", "on_kernel"), [("auto", False), ("cpu_kernel", True), ("grouped_mm", False), ("loop", False)]
)
def test_router_logits_use_the_kernel_gemm_where_the_experts_do(impl, on_kernel):
    from moetrain.model.moe import RoutingCore

    core = RoutingCore(D, MoEConfig(num_experts=4, top_k=2, expert_impl=impl))
    assert (core.router.expert_impl == "cpu_kernel") == on_kernel
    torch.nn.init.normal_(core.router.weight_ED)
    x = torch.randn(9, D)
    logits = core.router(x).logits_TE
    ran_on_kernel = type(logits.grad_fn).__name__ == "KernelLinearBackward"
    assert ran_on_kernel == (on_kernel and cpu_has_avx512())
    torch.testing.assert_close(logits, x @ core.router.weight_ED.t(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- SwiGLU's elementwise passes (csrc/f32_swiglu.cpp)
@needs_avx512
@pytest.mark.parametrize("n", [*range(1, 18), 4099])
def test_own_swiglu_passes_equal_float64(n):
    """g = silu(h1) h3 and the gradient (g, dh1, dh3) on the kernel's AVX-512 code, its own exp inside, against
    float64 over h1 in [-100, 100] (beyond exp's fp32 range at both ends), with every tail length of a lane (n of
    1-17) and a long run. The
    absolute tolerance is for dh1 near silu's minimum (h1 = -1.28), where 1 + h1 (1 - s) cancels in fp32."""
    torch.manual_seed(n)
    kernel = cpu_experts._build()
    h1 = torch.cat(
        [torch.tensor([-100.0, -89.0, -88.0, -20.0, -1e-6, 0.0, 1e-6, 20.0, 88.0, 89.0, 100.0]), torch.randn(n) * 6]
    )[:n].contiguous()
    h3, dg = torch.randn(n), torch.randn(n)
    x, u, d = (t.double() for t in (h1, h3, dg))
    s = torch.sigmoid(x)
    refs = [x * s * u, d * u * s * (1 + x * (1 - s)), d * x * s]
    got = [kernel.f32_swiglu_forward(h1, h3)] + list(kernel.f32_swiglu_backward(h1, h3, dg))
    for name, value, ref in zip(["forward g", "backward g", "dh1", "dh3"], got, [refs[0], *refs]):
        torch.testing.assert_close(value.double(), ref, rtol=2e-6, atol=1e-7, msg=lambda m, k=name: f"{k}: {m}")
