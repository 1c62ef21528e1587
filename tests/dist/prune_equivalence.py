"""Run under torchrun with 2 ranks: expert surgery and expert LoRA under expert parallelism.

1. For each (backend, ep_size, ZeRO stage): a model trained two steps inside a DeepSpeed engine is pruned
   physically; its logits equal the unpruned model's with the same experts masked (eval capacity 1.0, so
   capacity shares are checked too); Adam moments and the step of every surviving parameter are those of the
   old optimizer (expert moments compared over all experts, gathered); training continues.
2. LoRA on experts and router: adapter gradients with ep_size=2 equal the ep_size=1 gradients (expert
   adapters: summed over the expert-parallel group, this rank's experts).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moetrain.config import ModelConfig, MoEConfig, ParallelConfig, TrainConfig, TrainerConfig
from moetrain.runtime.distributed import init_distributed
from moetrain.train.engine import build_engine, build_model_for_engine, prepare_model_for_engine
from moetrain.surgery.experts import full_expert_stacks, prune_model
from moetrain.train.optim_state import read_moments, write_moments
from moetrain.train.stages import StageSchedule

E = 8
DROP = [[1, 6], [0, 3]]  # experts removed from MoE layers 0 and 1
KEEP = [[e for e in range(E) if e not in d] for d in DROP]


def config(backend: str, ep: int, zero: int) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, vocab_size=300, seq_len=16),
        moe=MoEConfig(num_experts=E, top_k=2, backend=backend, eval_capacity_factor=1.0, min_capacity=1),
        parallel=ParallelConfig(ep_size=ep, zero_stage=zero),
        trainer=TrainerConfig(micro_batch_size=2, max_steps=10),
    )


def engine_for(model, cfg):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return build_engine(model, cfg, StageSchedule(cfg.schedule, cfg.moe, cfg.trainer.max_steps, names))


def train_steps(engine, n: int, rank: int) -> None:
    engine.train()
    for i in range(n):
        g = torch.Generator().manual_seed(1000 * i + rank)
        x = torch.randint(0, 300, (2, 16), generator=g)
        out = engine(x)
        loss = torch.nn.functional.cross_entropy(out.logits_BSV.flatten(0, 1), x.roll(-1, 1).flatten()) + out.aux_loss
        engine.backward(loss)
        engine.step()


def surgery(backend: str, ep: int, zero: int, rank: int) -> None:
    cfg = config(backend, ep, zero)
    torch.manual_seed(0)
    model, _ = build_model_for_engine(cfg)
    engine = engine_for(model, cfg)
    train_steps(engine, 2, rank)
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(77 + rank))
    engine.eval()
    for layer, drop in zip(model.moe_layers(), DROP):
        mask = torch.ones(E, dtype=torch.bool)
        mask[drop] = False
        layer.set_expert_mask(mask)
    with torch.no_grad():
        ref = model(x).logits_BSV
    for layer in model.moe_layers():
        layer.set_expert_mask(torch.ones(E, dtype=torch.bool))

    moments, step = read_moments(engine, model)
    names = {id(p): n for n, p in model.named_parameters()}
    old_full = [
        {k: full_expert_stacks(core, lambda p, k=k: moments[names[id(p)]][k]) for k in ("exp_avg", "exp_avg_sq")}
        for core in model.moe_layers()
    ]
    old_router = [moments[names[id(core.router.weight_ED)]]["exp_avg_sq"].clone() for core in model.moe_layers()]
    old_emb = moments["tok_emb.weight"]["exp_avg"].clone()

    ep_group = model.moe_layers()[0].ep_group if backend == "native" else None
    moved = prune_model(model, cfg.moe, KEEP, ep, ep_group, moments)
    engine.destroy()
    prepare_model_for_engine(model, cfg)
    engine = engine_for(model, cfg)
    write_moments(engine, model, moved, step)

    engine.eval()
    with torch.no_grad():
        out = model(x).logits_BSV
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert [c.num_experts for c in model.moe_layers()] == [len(k) for k in KEEP]

    new_moments, new_step = read_moments(engine, model)
    assert new_step == step, (new_step, step)
    torch.testing.assert_close(new_moments["tok_emb.weight"]["exp_avg"], old_emb)
    names = {id(p): n for n, p in model.named_parameters()}
    for core, full, router_sq, keep in zip(model.moe_layers(), old_full, old_router, KEEP):
        idx = torch.tensor(keep)
        rows = new_moments[names[id(core.router.weight_ED)]]["exp_avg_sq"]
        torch.testing.assert_close(rows, router_sq[idx])
        for k, stacks in full.items():
            new_full = full_expert_stacks(core, lambda p, k=k: new_moments[names[id(p)]][k])
            for name, stack in stacks.items():
                assert float(stack.abs().sum()) > 0, (name, k)  # moments exist (two steps were taken)
                torch.testing.assert_close(new_full[name], stack[idx])
    train_steps(engine, 1, rank)  # the rebuilt engine trains
    engine.destroy()
    if rank == 0:
        print(f"SURGERY-OK backend={backend} ep={ep} zero={zero}", flush=True)


def lora_grads(rank: int) -> None:
    from moetrain.config import LoRAConfig
    from moetrain.surgery.lora import LoRAAdapters

    grads = {}
    for ep in (1, 2):
        cfg = config("native", ep, 0)
        cfg.moe.eval_capacity_factor = None
        torch.manual_seed(0)
        model, _ = build_model_for_engine(cfg)
        LoRAAdapters(LoRAConfig(targets=["router", "experts"], rank=2, alpha=4.0), "native").attach(model)
        prepare_model_for_engine(model, cfg)
        group = model.moe_layers()[0].ep_group
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # the same full B for every ep_size, sliced by expert for the shards
                    g = torch.Generator().manual_seed(len(name))
                    if ".experts" in name:
                        full = torch.randn(p.shape[0], 2, E, generator=g)
                        n = E // ep
                        r = dist.get_rank(group) if group is not None else 0
                        p.copy_(full[:, :, r * n : (r + 1) * n].reshape(p.shape[0], -1))
                    else:
                        p.copy_(torch.randn(p.shape, generator=g))
        x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(5 + rank))
        out = model(x).logits_BSV
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(9 + rank))
        (out * upstream).sum().backward()
        grads[ep] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
        grads[f"group{ep}"] = group
    group = grads["group2"]
    r = dist.get_rank(group)
    checked = 0
    for name, g2 in grads[2].items():
        g1 = grads[1][name]
        if ".experts" in name:
            g1 = g1.clone()
            dist.all_reduce(g1, group=group)  # each expert's adapter sees the tokens of the whole group
            n = E // 2
            if "lora_A" in name:  # (E * r, in), expert-major rows
                g1 = g1.reshape(E, -1, g1.shape[-1])[r * n : (r + 1) * n].reshape(g2.shape)
            else:  # (out, r * E), expert-minor columns
                g1 = g1.reshape(g1.shape[0], -1, E)[:, :, r * n : (r + 1) * n].reshape(g2.shape)
        torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        checked += 1
    assert checked >= 8, checked
    if rank == 0:
        print(f"LORA-EP-OK {checked} adapter gradients", flush=True)


def main() -> None:
    env = init_distributed()
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for backend, ep, zero in [
        ("native", 1, 0),
        ("native", 2, 0),
        ("native", 2, 1),
        ("deepspeed", 2, 0),
        ("deepspeed", 1, 1),
    ]:
        surgery(backend, ep, zero, env.rank)
    lora_grads(env.rank)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
