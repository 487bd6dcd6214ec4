"""Moved to ``llmhift.build``; the names the README documented here still import."""

from llmhift.build.parallel import average_gloo_fsdp2_gradients
from llmhift.build.trainer import build_trainer

__all__ = ["average_gloo_fsdp2_gradients", "build_trainer"]
