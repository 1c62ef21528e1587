"""Expert parallelism for ``moe.backend=native`` inside the DeepSpeed engine.

DeepSpeed handles expert-parallel parameters through three conventions, which we follow:

1. process groups from ``deepspeed.utils.groups._create_expert_and_data_parallel(ep_size)``, named
   ``ep_size_<N>``: expert-parallel groups of consecutive ranks, and expert-data-parallel groups across them
   (our all-to-all runs on DeepSpeed's expert-parallel group, so both agree on who owns which expert);
2. expert parameters tagged ``allreduce=False`` and ``group_name=ep_size_<N>``: DeepSpeed then reduces their
   gradients over the expert-data-parallel group only (ZeRO-0 bucketed all-reduce, ZeRO-1/2 partitions),
   and the optimizer gets separate MoE parameter groups;
3. the engine switches those code paths on only when the model contains a ``deepspeed.moe.layer.MoE``
   module. :class:`ExpertParallelRegistration` is such a module holding no weights (``num_local_experts=0``):
   it declares the group to the engine; DeepSpeed's per-expert checkpoint files stay empty for it, and our
   expert shards are saved per expert-parallel rank by :mod:`moetrain.train.checkpoint`.
"""

from __future__ import annotations

import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn


def expert_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


def create_expert_parallel_groups(ep_size: int) -> dist.ProcessGroup:
    """DeepSpeed's expert-parallel and expert-data-parallel groups; returns this rank's expert-parallel group."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist.get_backend())
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name)


class ExpertParallelRegistration(MoE):
    """Declares to the DeepSpeed engine that the model has expert-parallel parameters of group ``ep_size_<N>``.

    It subclasses ``deepspeed.moe.layer.MoE`` only to be recognised; it owns no parameters and is never called.
    """

    def __init__(self, num_experts: int, ep_size: int) -> None:
        nn.Module.__init__(self)  # deliberately not MoE.__init__: no gate, no experts of DeepSpeed's own
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = 0
        self.expert_group_name = expert_group_name(ep_size)
        self.use_residual = False

    def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
        """Groups are created before the model (its all-to-alls need them); nothing left to do."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("ExpertParallelRegistration is a marker for the DeepSpeed engine and is never called")


def mark_expert_parameters(model: nn.Module, ep_size: int) -> int:
    """Tag every expert-sharded parameter for DeepSpeed and attach the registration. Returns how many."""
    from moetrain.model.moe import MoELayer

    name = expert_group_name(ep_size)
    count = 0
    num_experts = 0
    for layer in model.modules():
        if isinstance(layer, MoELayer) and layer.ep_size > 1:
            num_experts = layer.num_experts
            for p in layer.experts.parameters():
                p.allreduce = False
                p.group_name = name
                count += 1
    if count:
        model.add_module("ds_expert_parallel", ExpertParallelRegistration(num_experts, ep_size))
    return count


class ExpertShards:
    """Saves and restores this rank's expert weights, one safetensors file per expert-parallel rank.

    DeepSpeed writes the module state from data-parallel rank 0 only, which holds just its own experts;
    this file keeps every rank's shard. It is written by expert-data-parallel rank 0 of each shard.
    """

    def __init__(self, model: nn.Module, ep_size: int) -> None:
        from moetrain.model.moe import MoELayer

        self.ep_size = ep_size
        self.params = {
            f"{layer_name}.experts.{pname}": p
            for layer_name, layer in model.named_modules()
            if isinstance(layer, MoELayer) and layer.ep_size > 1
            for pname, p in layer.experts.named_parameters()
        }
        name = expert_group_name(ep_size)
        self.ep_rank = groups._get_expert_parallel_rank(name)
        self.is_writer = groups._get_expert_data_parallel_rank(name) == 0

    def filename(self) -> str:
        return f"experts_ep{self.ep_rank:03d}-of-{self.ep_size:03d}.safetensors"

    def save(self, directory) -> None:
        import os

        from safetensors.torch import save_file

        if not self.is_writer:
            return
        path = directory / self.filename()
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.params.items()}, str(tmp))
        os.replace(tmp, path)

    def load(self, directory) -> None:
        import torch
        from safetensors.torch import load_file

        path = directory / self.filename()
        if not path.is_file():
            raise FileNotFoundError(
                f"trainer.resume: {path} is missing: this checkpoint was not saved with parallel.ep_size="
                f"{self.ep_size} (expert shards are not re-split on load)"
            )
        state = load_file(str(path))
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state[k])
