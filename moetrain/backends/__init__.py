"""Adapters between our MoE layers and the engines/kernels that run them."""
