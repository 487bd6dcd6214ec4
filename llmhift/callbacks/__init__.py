"""llmhift callbacks for a vanilla Composer Trainer: pruning, dynamic batch loading, HiFT, distillation,
checkpoint metadata, AdaLoRA's rank allocator, downstream evaluation during training."""

from llmhift.callbacks.adalora import AdaLoRAAllocator
from llmhift.callbacks.checkpoint_metadata import CheckpointMetadataCallback
from llmhift.callbacks.distillation import DistillationCallback
from llmhift.callbacks.downstream import DownstreamEvalCallback
from llmhift.callbacks.dynamic_loading import DynamicLoadingCallback
from llmhift.callbacks.hift import DDPFindUnusedParameters, HiFTCallback
from llmhift.callbacks.pruning import PruningCallback
from llmhift.callbacks.task_balance import TaskBalanceCallback

__all__ = [
    "AdaLoRAAllocator",
    "CheckpointMetadataCallback",
    "DDPFindUnusedParameters",
    "DistillationCallback",
    "DownstreamEvalCallback",
    "DynamicLoadingCallback",
    "HiFTCallback",
    "PruningCallback",
    "TaskBalanceCallback",
]
