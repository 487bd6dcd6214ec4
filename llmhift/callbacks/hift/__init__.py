"""HiFT: the callback, the DDP Algorithm it needs on several ranks, its pure schedule and its state parking."""

from llmhift.callbacks.hift.callback import HiFTCallback
from llmhift.callbacks.hift.ddp import DDPFindUnusedParameters

__all__ = ["HiFTCallback", "DDPFindUnusedParameters"]
