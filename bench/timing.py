"""Wall time of one call, synchronising the GPU around it so queued kernels are counted."""

import time
from typing import Callable

import torch


def wall_seconds(run: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
