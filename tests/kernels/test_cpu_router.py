"""The router's fused pass on the CPU kernel (csrc/softmax_router.cpp) against ATen's router code in float64."""

from __future__ import annotations

import pytest
import torch
from helpers.cpu_features import needs_avx512, on_thread_counts

from moetrain.config import MoEConfig
from moetrain.config.choices import ExpertImpl
from moetrain.kernels import expert_kernel
from moetrain.model.moe import MoELayer
from moetrain.model.router import TopKRouter, balance_loss, z_loss_of_lse

pytestmark = needs_avx512
D = 12


def one_pass(router: TopKRouter, logits: torch.Tensor):
    """The router's one-pass softmax route on the CPU kernel, from given logits, nothing masked."""
    kernel = expert_kernel("cpu_kernel", logits.device, logits.dtype)
    return router._route_one_pass(kernel.softmax_route, logits, None)


def make_router(E, top_k, *, masked=(), bias_scale=0.05, seed=0, **kw) -> TopKRouter:
    torch.manual_seed(seed)
    router = TopKRouter(D, E, top_k, expert_impl="cpu_kernel", **kw)
    with torch.no_grad():
        router.weight_ED.normal_(0, 1.0)
        router.bias_E.normal_(0, bias_scale)
        router.active_E[list(masked)] = False
    return router


def losses(routing, upstream_TK, T):
    """A task term through the gates plus the aux and z losses: every differentiable output of the pass."""
    counts_E = torch.bincount(routing.expert_idx_TK.reshape(-1), minlength=routing.probs_TE.shape[1])
    aux = balance_loss(routing.mean_dist_E, counts_E, routing.expert_idx_TK.numel(), 5)
    return (routing.gates_TK * upstream_TK).sum() + 0.3 * aux + 0.7 * z_loss_of_lse(routing.lse_T)


CASES = [
    # (E, top_k, renormalize, renormalize_top1, routed_scaling_factor, masked experts)
    (8, 1, True, False, 1.0, ()),
    (8, 1, True, True, 1.0, ()),
    (8, 2, True, False, 1.0, ()),
    (8, 2, False, False, 2.5, (3,)),
    (8, 4, True, False, 1.0, (0, 5)),
    (8, 6, True, False, 1.0, (1, 2)),  # k = every active expert
    (20, 3, True, False, 1.0, (4, 17, 19)),  # E not a multiple of 16: a masked lane tail
    (64, 1, False, False, 1.0, ()),
    (64, 2, True, False, 1.5, tuple(range(0, 64, 7))),
]


@pytest.mark.parametrize(("E", "top_k", "renormalize", "top1", "scale", "masked"), CASES)
def test_fused_router_equals_aten_router_in_float64(E, top_k, renormalize, top1, scale, masked):
    router = make_router(
        E, top_k, masked=masked, renormalize=renormalize, renormalize_top1=top1, routed_scaling_factor=scale
    )
    T = 150  # two full blocks of 64 tokens and a partial one
    torch.manual_seed(1)
    x = torch.randn(T, D)
    upstream = torch.randn(T, top_k)
    ours = router(x)
    assert type(ours.gates_TK.grad_fn).__name__ == "FusedSoftmaxRouterBackward"
    (dlogits,) = torch.autograd.grad(losses(ours, upstream, T), ours.logits_TE)

    logits64 = ours.logits_TE.detach().double().requires_grad_(True)
    masked_E = ~router.active_E if masked else None
    ref = router._route_aten(logits64, masked_E)
    (dlogits64,) = torch.autograd.grad(losses(ref, upstream.double(), T), logits64)

    assert torch.equal(ours.expert_idx_TK, ref.expert_idx_TK)
    for name in ("probs_TE", "gates_TK", "lse_T", "mean_dist_E", "entropy_sum"):
        torch.testing.assert_close(getattr(ours, name).double(), getattr(ref, name), rtol=2e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(dlogits.double(), dlogits64, rtol=1e-5, atol=1e-6)
    if masked:
        assert not ours.probs_TE[:, list(masked)].any() and not dlogits[:, list(masked)].any()
    # what rerouting ranks, computed on demand from the pass's scores
    torch.testing.assert_close(ours.selection_TE.double(), ref.selection_TE)


def test_each_loss_reaches_the_logits():
    """The gradient of each differentiable output alone (the others None in the backward) against float64."""
    router = make_router(16, 2, masked=(5,))
    x = torch.randn(70, D)
    ours = router(x)
    logits64 = ours.logits_TE.detach().double().requires_grad_(True)
    ref = router._route_aten(logits64, ~router.active_E)
    for pick in (lambda r: r.gates_TK[:, 1].sum(), lambda r: r.lse_T.square().mean(), lambda r: r.mean_dist_E[3]):
        (ours_grad,) = torch.autograd.grad(pick(ours), ours.logits_TE, retain_graph=True)
        (ref_grad,) = torch.autograd.grad(pick(ref), logits64, retain_graph=True)
        torch.testing.assert_close(ours_grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


def test_ties_go_to_the_lower_expert_index():
    router = make_router(10, 3, masked=(1,), bias_scale=0.0)
    with torch.no_grad():
        router.weight_ED.zero_()  # every score equal
    routing = router(torch.randn(5, D))
    assert routing.expert_idx_TK.tolist() == [[0, 2, 3]] * 5
    torch.testing.assert_close(routing.gates_TK, torch.full((5, 3), 1 / 3))


def test_far_below_the_maximum_a_score_is_zero_and_the_sums_stay_finite():
    """A logit more than exp's fp32 range below its row's maximum gets p = 0 (no NaN from the entropy's log)."""
    router = make_router(4, 1)
    logits = torch.tensor([[0.0, -200.0, -50.0, 1.0]], requires_grad=True)
    routing = one_pass(router, logits)
    assert routing.probs_TE[0, 1] == 0
    ref = router._route_aten(logits.detach().double(), None)
    torch.testing.assert_close(routing.entropy_sum.double(), ref.entropy_sum, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(routing.lse_T.double(), ref.lse_T)


def test_a_nan_logit_makes_its_row_nan_as_on_aten():
    """A NaN must not vanish from a row (a max over it would drop it): its scores, lse and gates come out NaN and
    the loss with them; the other rows are untouched."""
    router = make_router(20, 2)
    logits = torch.randn(70, 20)
    logits[3, 17] = float("nan")
    ours = one_pass(router, logits.requires_grad_(True))
    ref = router._route_aten(logits.detach().double(), None)
    for name in ("probs_TE", "gates_TK", "lse_T"):
        got, want = getattr(ours, name), getattr(ref, name)
        assert got[3].isnan().all() and want[3].isnan().all(), name
        torch.testing.assert_close(got[torch.arange(70) != 3].double(), want[torch.arange(70) != 3], msg=name)
    assert ours.mean_dist_E.isnan().all() and ours.entropy_sum.isnan()


def test_a_nan_selection_bias_is_an_error():
    """Top-k ranks p + bias with ordered comparisons: a NaN in the balancing bias is refused, naming it."""
    router = make_router(20, 2)
    with torch.no_grad():
        router.bias_E[7] = float("nan")
    with pytest.raises(RuntimeError, match="selection bias .* has NaN entries"):
        router(torch.randn(5, D))


def test_top_k_over_many_chunks_with_ties_and_masks():
    """70 experts (5 chunks, the last one partial), four of them masked, and many equal scores: the kernel's top-k
    is the first k of a stable descending sort of its own scores + bias (masked -inf): best first, ties to the lower
    index. (torch.topk breaks ties in no stated order, so the ATen router cannot be the reference here.)"""
    torch.manual_seed(3)
    router = make_router(70, 5, masked=(0, 16, 33, 69), bias_scale=0.0)
    with torch.no_grad():
        router.weight_ED.copy_(torch.randint(-1, 2, router.weight_ED.shape).float())  # few distinct logits
        router.bias_E[torch.arange(0, 70, 3)] = 0.25  # ties among the biased experts too
    ours = router(torch.randint(-1, 2, (200, D)).float())
    ranked_TE = torch.sort(ours.selection_TE, dim=1, descending=True, stable=True).indices
    assert torch.equal(ours.expert_idx_TK, ranked_TE[:, :5])
    assert (ours.probs_TE.unsqueeze(1) == ours.probs_TE.gather(1, ours.expert_idx_TK).unsqueeze(2)).sum() > 2 * 200 * 5


def test_same_bits_on_one_and_two_threads():
    router = make_router(64, 2, masked=(3, 9))
    x = torch.randn(1000, D)

    def route():
        routing = router(x)
        (dlogits,) = torch.autograd.grad(losses(routing, torch.ones(1000, 2), 1000), routing.logits_TE)
        return [routing.probs_TE, routing.gates_TK, routing.lse_T, routing.mean_dist_E, routing.entropy_sum, dlogits]

    for a, b in zip(*on_thread_counts(route)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kw", "fused"),
    [({}, True), ({"score_func": "sigmoid"}, False), ({"n_group": 2, "topk_group": 1}, False)],
)
def test_fused_pass_runs_for_softmax_without_group_limits(kw, fused):
    router = make_router(8, 2, **kw)
    routing = router(torch.randn(6, D))
    assert (type(routing.gates_TK.grad_fn).__name__ == "FusedSoftmaxRouterBackward") == fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_losses_and_router_gradient_match_the_aten_router(dtype):
    """The MoE layer's aux and z losses and the router weight's gradient from them: kernel router vs ATen's. In a
    bfloat16 layer the router still runs in fp32 (its logits, and so the fused pass), the experts in bfloat16."""
    cfg = MoEConfig(num_experts=8, top_k=2, capacity_factor=1.0, drop_policy="reroute", min_capacity=1)
    layers = []
    for on_kernel in (True, False):
        torch.manual_seed(0)
        layer = MoELayer(D, 16, cfg)
        layer.reset_parameters(0.3, 0.3)
        layer.router.expert_impl = ExpertImpl.cpu_kernel if on_kernel else ExpertImpl.auto
        layers.append(layer.to(dtype))
    x = torch.randn(2, 40, D).to(dtype)
    results = []
    for layer in layers:
        out, stats = layer(x)
        (out.square().sum() + 0.5 * stats.aux_loss + 0.2 * stats.z_loss).backward()
        results.append((out, stats))
    (out_k, st_k), (out_a, st_a) = results
    fused = [
        type(layer.router(x.reshape(-1, D)).gates_TK.grad_fn).__name__ == "FusedSoftmaxRouterBackward"
        for layer in layers
    ]
    assert fused == [True, False]
    assert out_k.dtype == dtype and layers[0].router.weight_ED.grad.dtype == dtype
    # the gates agree to fp32 rounding; a bfloat16 layer rounds the gate-weighted outputs to its 8 bits
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-3}
    torch.testing.assert_close(out_k, out_a, **tol)
    for name in ("aux_loss", "z_loss", "entropy_sum", "gate_mass_E"):  # fp32 router outputs in either layer
        torch.testing.assert_close(getattr(st_k, name), getattr(st_a, name), rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(st_k.saliency_sum_E, st_a.saliency_sum_E, **tol)
    assert (st_k.dropped, st_k.rerouted) == (st_a.dropped, st_a.rerouted) and st_k.rerouted > 0
    # with the expert outputs in the gates' gradient: agree to the rounding of the largest entry
    grad_k, grad_a = layers[0].router.weight_ED.grad.float(), layers[1].router.weight_ED.grad.float()
    rtol, scale = (1e-4, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    torch.testing.assert_close(grad_k, grad_a, rtol=rtol, atol=scale * float(grad_a.abs().max()))


def test_a_gate_sum_under_the_clamp_renormalises_by_the_clamp():
    """Renormalisation divides by max(sum of the k scores, 1e-20), as router.combine_gates. The bias can select
    experts whose scores sum below that (logits ~50 under the row's maximum): their gates are score / 1e-20 and
    the constant denominator adds nothing to the gradient. Row 1 is not clamped."""
    router = make_router(4, 2, bias_scale=0.0)
    with torch.no_grad():
        router.bias_E.copy_(torch.tensor([0.0, 10.0, 9.0, 0.0]))  # selects experts 1 and 2 in every row, no ties
    logits = torch.tensor([[0.0, -50.0, -52.0, -1.0], [0.0, -1.0, -2.0, 0.5]], requires_grad=True)
    ours = one_pass(router, logits)
    logits64 = logits.detach().double().requires_grad_(True)
    ref = router._route_aten(logits64, None)
    assert ours.expert_idx_TK.tolist() == ref.expert_idx_TK.tolist() == [[1, 2], [1, 2]]
    clamped = ref.probs_TE[0, 1:3].sum().detach()
    assert clamped < 1e-20 and float(ref.gates_TK[0].sum().detach()) == pytest.approx(float(clamped) / 1e-20)
    torch.testing.assert_close(ours.gates_TK.double(), ref.gates_TK, rtol=2e-6, atol=0)
    upstream = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    (grad,) = torch.autograd.grad((ours.gates_TK * upstream).sum(), logits)
    (grad64,) = torch.autograd.grad((ref.gates_TK * upstream.double()).sum(), logits64)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-5, atol=1e-7)


def test_selection_scores_asked_for_later_rank_with_the_bias_of_the_call():
    """The fused pass does not write the selection scores; computed on demand after the bias moved on (the
    aux-loss-free update runs between steps), they must still be this call's scores + this call's bias."""
    router = make_router(8, 2, masked=(6,))
    routing = router(torch.randn(20, D))
    bias_then = router.bias_E.clone()
    with torch.no_grad():
        router.bias_E.add_(1.0)
    want = (routing.probs_TE + bias_then).masked_fill(~router.active_E, float("-inf"))
    torch.testing.assert_close(routing.selection_TE, want)
