"""Inference in the API process: one base model shared by its adapters, batched generation,
the model cache and prompts. It imports no training code."""
