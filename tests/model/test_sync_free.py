"""The MoE layer's forward + backward waits for the host as little as a GPU allows: counted on CPU with a
TorchDispatchMode over the ops that force a device->host synchronisation on a GPU (a tensor read as a Python
number, bincount, nonzero, boolean indexing, ...) and with ``Tensor.tolist`` / ``Tensor.item`` counted too.

Dropless on ``torch._grouped_mm``: none. Dropless on the per-expert loop: one (its group sizes). With a capacity
factor: one (the kept assignments size the permutation). The routing statistics stay device tensors until the
metrics interval."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moetrain.config import MoEConfig
from moetrain.metrics.routing import RoutingMetrics
from moetrain.model.moe import MoELayer

# ops whose output size or value the host must read before it can go on
SYNCING = {
    "aten._local_scalar_dense.default",  # item(), int(t), float(t), bool(t)
    "aten.nonzero.default",
    "aten.bincount.default",
    "aten.masked_select.default",
    "aten.repeat_interleave.Tensor",
    "aten._unique2.default",
    "aten.unique_consecutive.default",
    "aten.unique_dim.default",
}


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in SYNCING:
            self.ops.append(name)
        elif name.startswith("aten.index.Tensor") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool
            for a in args
            if isinstance(a, list | tuple)
            for t in a
        ):
            self.ops.append("boolean indexing")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def counted(monkeypatch):
    """A counter that also sees ``tolist`` and ``item`` (read on the host without an ATen op)."""
    counter = SyncCounter()
    for method in ("tolist", "item"):
        original = getattr(torch.Tensor, method)

        def wrapped(self, *a, _original=original, _name=method, **kw):
            counter.ops.append(_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, method, wrapped)
    return counter


def layer(**moe) -> MoELayer:
    torch.manual_seed(0)
    m = MoELayer(16, 32, MoEConfig(num_experts=4, top_k=2, **moe))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return m


def syncs(counter: SyncCounter, m: MoELayer, metrics: RoutingMetrics | None = None) -> list[str]:
    x = torch.randn(2, 8, 16, requires_grad=True)
    m(x)  # the first call counts the active experts once (cached until the mask changes)
    counter.ops.clear()
    with counter:
        y, stats = m(x)
        (y.float().sum() + stats.aux_loss + stats.z_loss).backward()
        if metrics is not None:
            metrics.update([stats])
    return list(counter.ops)


@pytest.mark.parametrize(
    ("moe", "expected"),
    [
        ({"expert_impl": "grouped_mm"}, []),  # dropless: group sizes stay on the device
        ({"expert_impl": "loop"}, ["tolist"]),  # one GEMM per expert needs the sizes on the host
        ({"capacity_factor": 1.25, "drop_policy": "probs"}, ["aten.nonzero.default"]),
        ({"capacity_factor": 1.25, "drop_policy": "position"}, ["aten.nonzero.default"]),
    ],
)
def test_a_layer_forward_and_backward_syncs_at_most_once(counted, moe, expected):
    m = layer(**moe)
    assert syncs(counted, m, RoutingMetrics(1, 4)) == expected


def test_the_routing_statistics_reach_numbers_only_when_reduced(counted):
    m, metrics = layer(expert_impl="grouped_mm"), RoutingMetrics(1, 4)
    for _ in range(3):
        assert syncs(counted, m, metrics) == []
    out = metrics.reduce_and_reset()  # the interval's one reduction
    assert sum(out["moe/layer0/routed_per_expert"]) == 3 * 16 * 2 and out["moe/layer0/dropped_frac"] == 0.0
    assert metrics.sums_LX.abs().sum() == 0  # reset for the next interval


def test_the_active_count_follows_every_change_of_the_mask():
    m = layer()
    assert m.base_router.num_active == 4
    m.set_expert_mask(torch.tensor([True, False, True, True]))
    assert m.base_router.num_active == 3
    state = m.state_dict()
    state["router.active_E"] = torch.tensor([True, True, False, False])
    m.load_state_dict(state)  # a checkpoint's mask
    assert m.base_router.num_active == 2
    y, stats = m(torch.randn(1, 8, 16))
    assert stats.routed_per_expert_E[2:].sum() == 0 and stats.routed_per_expert_E.sum() == 16
