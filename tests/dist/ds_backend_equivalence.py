"""Run under torchrun (2 ranks): the DeepSpeed backend's MoE layer equals the native layer on the same weights.

Usage: torchrun --nproc_per_node 2 tests/dist/ds_backend_equivalence.py EP_SIZE
For k in {1, 2} and for dropless plus each drop policy at a small capacity: outputs, input and router
gradients, expert gradients (summed over the expert-parallel group, as the native test does), token counts
and drops are equal; then top_k is switched 2 -> 1 at run time, then two experts are masked, and both are
compared again.
"""

from __future__ import annotations

import sys

import deepspeed
import torch
import torch.distributed as dist

from moetrain.backends.deepspeed_moe import DeepSpeedMoELayer
from moetrain.config import MoEConfig
from moetrain.runtime.distributed import init_distributed
from moetrain.model.moe import MoELayer

D, F, E = 16, 24, 8
TOL = dict(rtol=1e-5, atol=1e-5)


def build(cfg: MoEConfig, ep_size: int, rank: int):
    native = MoELayer(D, F, cfg)
    ds = DeepSpeedMoELayer(D, F, cfg, ep_size, rank % ep_size)
    ds.moe.set_deepspeed_parallelism()
    for layer in (native, ds.gate):
        torch.manual_seed(0)
        layer.reset_parameters(0.5, 0.3)
    return native, ds


def compare(native, ds, ep_size: int, rank: int, label: str) -> None:
    torch.manual_seed(100 + rank)
    x = torch.randn(2, 7 + rank, D)  # uneven token counts per rank
    upstream = torch.randn_like(x)
    outs = []
    for layer in (native, ds):
        xi = x.clone().requires_grad_(True)
        y, stats = layer(xi)
        (y * upstream).sum().backward()
        outs.append((y, stats, xi.grad))
    (y_n, s_n, gx_n), (y_d, s_d, gx_d) = outs
    torch.testing.assert_close(y_d, y_n, **TOL, msg=f"{label}: output")
    torch.testing.assert_close(gx_d, gx_n, **TOL, msg=f"{label}: grad x")
    torch.testing.assert_close(ds.gate.router.weight_ED.grad, native.router.weight_ED.grad, **TOL)
    assert torch.equal(s_d.tokens_per_expert_E, s_n.tokens_per_expert_E), label
    assert s_d.dropped == s_n.dropped and s_d.rerouted == s_n.rerouted, label
    torch.testing.assert_close(s_d.aux_loss, s_n.aux_loss)
    torch.testing.assert_close(s_d.saliency_sum_E, s_n.saliency_sum_E, rtol=1e-4, atol=1e-5)
    group = ds.gate.ep_group
    local = ds.moe.deepspeed_moe.experts.deepspeed_experts
    first = (rank % ep_size) * len(local)
    for name, stacked in (("w1", native.experts.w1_EDF), ("w3", native.experts.w3_EDF), ("w2", native.experts.w2_EFD)):
        g = stacked.grad.clone()
        if ep_size > 1:
            dist.all_reduce(g, group=group)
        for j, expert in enumerate(local):
            torch.testing.assert_close(getattr(expert, name).weight.grad, g[first + j].t(), **TOL)
    for p in [*native.parameters(), *ds.parameters()]:
        p.grad = None


def main(ep_size: int) -> None:
    env = init_distributed()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    for k in (1, 2):
        for cf, policy in ((None, "probs"), (0.75, "probs"), (0.75, "position"), (1.0, "reroute")):
            cfg = MoEConfig(num_experts=E, top_k=k, capacity_factor=cf, drop_policy=policy, min_capacity=1)
            native, ds = build(cfg, ep_size, env.rank)
            compare(native, ds, ep_size, env.rank, f"k={k} cf={cf} {policy}")
            if k == 2 and cf is None:
                native.top_k = ds.gate.top_k = 1  # the top-2 -> top-1 switch, at run time
                compare(native, ds, ep_size, env.rank, "switched to k=1")
                active = torch.tensor([True, False, True, True, True, True, False, True])
                native.set_expert_mask(active)  # pruned experts are never selected, on either backend
                ds.gate.set_expert_mask(active)
                compare(native, ds, ep_size, env.rank, "expert mask")
    dist.barrier()
    if env.rank == 0:
        print(f"DS-BACKEND-OK ep={ep_size}")


if __name__ == "__main__":
    main(int(sys.argv[1]))
