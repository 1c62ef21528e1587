"""Layer 5, backends: one :class:`~moetrain.backends.base.Backend` interface per ``moe.backend`` (native: our
layer; deepspeed: DeepSpeed's MoE layer with our router as its gate; megablocks: MegaBlocks' dropless MLP
behind our router, CUDA only), and the engine-side pieces of expert parallelism. It may import ``config``,
``runtime``, ``kernels`` and ``model``.
"""

from __future__ import annotations

from moetrain.backends.base import Backend, build_backend_model


def get_backend(name: str) -> Backend:
    """The backend ``moe.backend=name`` selects."""
    if name == "deepspeed":
        from moetrain.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend()
    if name == "megablocks":
        from moetrain.backends.megablocks import MegaBlocksBackend

        return MegaBlocksBackend()
    from moetrain.backends.native import NativeBackend

    return NativeBackend()


__all__ = ["Backend", "build_backend_model", "get_backend"]
