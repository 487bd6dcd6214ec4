"""llmhift callbacks for a vanilla Composer Trainer: pruning, dynamic batch loading, HiFT."""

from llmhift.callbacks.dynamic_loading import DynamicLoadingCallback
from llmhift.callbacks.hift import HiFTCallback
from llmhift.callbacks.pruning import PruningCallback

__all__ = ["DynamicLoadingCallback", "HiFTCallback", "PruningCallback"]
