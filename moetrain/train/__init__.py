"""Layer 6, train: the loop and what it sequences. Trainer, model state (model, engine, checkpoints and the
rebuild after a structure change), optimizer state, checkpoints, data, stage schedules, evaluation, losses.

It may import ``config``, ``runtime``, ``kernels``, ``model`` and ``backends``. Structure changes, metrics
sinks and export come in from above as components behind the interfaces of ``train.components``.
"""
