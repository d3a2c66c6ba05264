"""Helpers for tests, demos and benchmarks: small checkpoints written in the real NLD layout."""

from .checkpoint import tiny_config_dict, write_draft_lora, write_tiny_checkpoint

__all__ = ["write_tiny_checkpoint", "tiny_config_dict", "write_draft_lora"]
