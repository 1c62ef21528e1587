"""Layer 7, surgery: changes to a model's structure. Expert removal and merging, pruning rounds, LoRA
adapters, distillation and its teacher, and the :class:`~moetrain.surgery.ops.StructureOps` interface the
stage hooks act through.

It may import every layer below it (config, runtime, kernels, model, backends, train).
"""
