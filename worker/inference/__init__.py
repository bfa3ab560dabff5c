"""Serving adapters: one base model shared by its adapters, batched generation."""
