"""moe.backend=deepspeed against the native layer, on real gloo process groups (torchrun, 2 ranks)."""

from __future__ import annotations

import pytest
from helpers.launch import BIN, ROOT, free_port, run_launcher

from moetrain.runtime.distributed import LaunchEnv
from moetrain.train.checkpoint import CheckpointManager


@pytest.mark.slow
@pytest.mark.parametrize("ep_size", [1, 2])
def test_deepspeed_layer_equals_native(tmp_path, ep_size):
    """Dropless and every drop policy, k in {1, 2}, the 2 -> 1 switch: outputs, gradients, counts, drops."""
    proc = run_launcher(
        [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(ROOT / "tests" / "dist" / "ds_backend_equivalence.py"),
            str(ep_size),
        ],
        tmp_path,
        timeout=240,
    )
    assert f"DS-BACKEND-OK ep={ep_size}" in proc.stdout


def test_native_checkpoint_refuses_another_ep_size_with_a_clear_message(tmp_path):
    layout = {"backend": "native", "ep_size": 1, "zero_stage": 0, "world_size": 2}
    manager = CheckpointManager(tmp_path, LaunchEnv(0, 2, 0, 2), keep=1, layout=layout)
    with pytest.raises(ValueError, match=r"parallel.ep_size=2 expert shards; moe.backend=native resumes only"):
        manager._check_weights_portable({**layout, "ep_size": 2})
    with pytest.raises(ValueError, match=r"written with moe.backend=deepspeed"):
        manager._check_weights_portable({**layout, "backend": "deepspeed"})
    manager._check_weights_portable({**layout, "world_size": 4})  # weights-only is fine: same shards
