"""Run under torchrun: an expert-parallel MoE layer equals the ep_size=1 layer on the same weights and tokens.

Usage: torchrun --nproc_per_node N tests/dist/ep_equivalence.py EP_SIZE A2A_CHUNKS DROP_POLICY
Each rank routes its own tokens. Outputs and input/router gradients must equal the local ep_size=1
computation; each rank's expert gradients must equal the sum over all ranks of the ep_size=1 gradients of
the experts it owns.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from moetrain.config import MoEConfig
from moetrain.runtime.distributed import expert_parallel_group, init_distributed
from moetrain.model.moe import MoELayer

D, F, E = 16, 24, 8


def main(ep_size: int, chunks: int, policy: str) -> None:
    env = init_distributed()
    torch.set_num_threads(1)
    cf = None if policy == "dropless" else 1.0
    cfg = MoEConfig(
        num_experts=E,
        top_k=2,
        capacity_factor=cf,
        drop_policy="probs" if cf is None else policy,
        min_capacity=1,
        a2a_chunks=chunks,
    )
    torch.manual_seed(0)
    full = MoELayer(D, F, cfg)
    for p in full.parameters():
        torch.nn.init.normal_(p, std=0.5)
    group = expert_parallel_group(ep_size)
    ep_rank = dist.get_rank(group)
    sharded = MoELayer(D, F, cfg, ep_group=group)
    El = E // ep_size
    with torch.no_grad():
        sharded.router.weight_ED.copy_(full.router.weight_ED)
        for name in ("w1_EDF", "w3_EDF", "w2_EFD"):
            getattr(sharded.experts, name).copy_(getattr(full.experts, name)[ep_rank * El : (ep_rank + 1) * El])

    torch.manual_seed(100 + env.rank)
    tokens = 13 + 7 * env.rank  # uneven token counts per rank
    x = torch.randn(1, tokens, D)
    upstream = torch.randn(1, tokens, D)

    x_ref = x.clone().requires_grad_(True)
    y_ref, s_ref = full(x_ref)
    (y_ref * upstream).sum().backward()
    x_ep = x.clone().requires_grad_(True)
    y_ep, s_ep = sharded(x_ep)
    (y_ep * upstream).sum().backward()

    torch.testing.assert_close(y_ep, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_ep.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sharded.router.weight_ED.grad, full.router.weight_ED.grad, rtol=1e-5, atol=1e-5)
    assert s_ep.dropped == s_ref.dropped and torch.equal(s_ep.tokens_per_expert_E, s_ref.tokens_per_expert_E)
    torch.testing.assert_close(s_ep.aux_loss, s_ref.aux_loss)
    for name in ("w1_EDF", "w3_EDF", "w2_EFD"):
        # experts see the tokens of every rank of their EP group: sum the ep=1 grads over that group
        g = getattr(full.experts, name).grad.clone()
        dist.all_reduce(g, group=group)
        torch.testing.assert_close(
            getattr(sharded.experts, name).grad, g[ep_rank * El : (ep_rank + 1) * El], rtol=1e-5, atol=1e-5
        )
    dist.barrier()
    if env.rank == 0:
        print(f"EP-OK world={env.world_size} ep={ep_size} chunks={chunks} policy={policy}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
