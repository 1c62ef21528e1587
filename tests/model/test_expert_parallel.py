"""Expert-parallel MoE layer on real gloo process groups (torchrun): equal to ep_size=1 on the same weights."""

from __future__ import annotations

import pytest
from helpers.launch import BIN, ROOT, free_port, run_launcher

pytestmark = pytest.mark.slow

CASES = [
    (2, 2, 1, "dropless"),
    (2, 2, 3, "dropless"),
    (2, 2, 3, "reroute"),
    (4, 4, 1, "position"),
    (4, 4, 3, "dropless"),
    (4, 2, 3, "probs"),  # 2 expert-parallel groups x 2 expert-data-parallel replicas
]


@pytest.mark.parametrize(("world", "ep_size", "chunks", "policy"), CASES)
def test_expert_parallel_layer_equals_single_rank(tmp_path, world, ep_size, chunks, policy):
    proc = run_launcher(
        [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            str(world),
            "--master_port",
            str(free_port()),
            str(ROOT / "tests" / "dist" / "ep_equivalence.py"),
            str(ep_size),
            str(chunks),
            policy,
        ],
        tmp_path,
        timeout=180,
    )
    assert f"EP-OK world={world} ep={ep_size} chunks={chunks} policy={policy}" in proc.stdout
