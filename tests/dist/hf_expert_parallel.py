"""Run under torchrun (2 ranks): a Hugging Face checkpoint imported into an expert-parallel model (each rank
holds half the experts) gives the logits of the unsharded import.

Usage: torchrun --nproc_per_node 2 tests/dist/hf_expert_parallel.py HF_DIR
"""

from __future__ import annotations

import sys

import torch

from moetrain.config import TrainConfig
from moetrain.runtime.distributed import expert_parallel_group, init_distributed
from moetrain.interop.hf import load_hf, load_hf_weights
from moetrain.model import build_model


def main(hf_dir: str) -> None:
    env = init_distributed()
    torch.set_num_threads(1)
    full, model_cfg, moe_cfg = load_hf(hf_dir)
    sharded = build_model(model_cfg, moe_cfg, ep_group=expert_parallel_group(2))
    load_hf_weights(sharded, TrainConfig(model=model_cfg, moe=moe_cfg))
    assert sharded.layers[1].ffn.experts.w1_EDF.shape[0] == moe_cfg.num_experts // 2
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(env.rank))
    with torch.no_grad():
        torch.testing.assert_close(sharded.eval()(tokens).logits_BSV, full.eval()(tokens).logits_BSV)
    print(f"HF-EP-OK rank={env.rank}")


if __name__ == "__main__":
    main(sys.argv[1])
