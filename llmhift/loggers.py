"""A Composer logger that appends every logged metric to a JSON-lines file, for `llmhift.report`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO, Any, Optional

import torch
from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

__all__ = ["JsonlLogger", "EVAL_LABEL", "TRAIN_LOSS_KEY", "THROUGHPUT_KEY", "metric_key"]

# Composer's key layout, named once for every reader of the logs (llmhift.report). Composer logs metric
# <name> of evaluator <label> as ``metrics/<label>/<name>`` and each entry <k> of the loss as
# ``loss/train/<k>`` (``total`` always: a loss tensor is its total); SpeedMonitor logs the throughput.
EVAL_LABEL = "eval"  # the evaluator train.py builds from the yaml's eval_loader
TRAIN_LOSS_KEY = "loss/train/{}"
THROUGHPUT_KEY = "throughput/tokens_per_sec"


def metric_key(name: str, label: str = EVAL_LABEL) -> str:
    """The key Composer logs a metric under: ``metrics/eval/LanguageCrossEntropy``."""
    return f"metrics/{label}/{name}"


class JsonlLogger(LoggerDestination):
    """Appends one line ``{"batch": B, "<key>": value, ...}`` per ``log_metrics`` call to ``path``.

    Only global rank 0 writes. The file is appended to, so an autoresumed run continues it; a reader
    keeps the last value logged for a key at a batch (what the resumed run logged). Lines are
    flushed as they are written, so a crashed run leaves every metric up to the crash. The file is
    opened at the first metric, not when the Trainer is built: a run refused while it is being built
    neither creates nor touches another run's metrics.jsonl.

    Args:
        path (str): the file to append to; its folder is created (yaml default in the demo yamls:
            ``${save_folder}/metrics.jsonl``).

    Example (in a yaml: ``loggers: {jsonl: {path: ${save_folder}/metrics.jsonl}}``):
        >>> from composer import Trainer
        >>> trainer = Trainer(model=model, train_dataloader=loader, max_duration="10ba",
        ...                   loggers=[JsonlLogger("runs/demo/metrics.jsonl")])
        >>> trainer.fit()  # then: python -m llmhift.report runs

    Logs no metric of its own: it records the others (``loss/train/total``, ``metrics/eval/*``,
    ``pruning/*``, ``hift/*``, ``throughput/*``, ...), non-finite values as null.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        if not path:
            raise ValueError("path: give the metrics file, e.g. ${save_folder}/metrics.jsonl")
        self.path = Path(path)
        self._file: Optional[IO[str]] = None

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        if dist.get_global_rank() != 0:
            return
        record: dict[str, Any] = {"batch": step}
        for key, value in metrics.items():
            if _is_scalar(value):
                number = float(value.item() if isinstance(value, torch.Tensor) else value)
                record[key] = number if math.isfinite(number) else None  # JSON has no NaN
        if len(record) > 1:  # Composer also logs empty dicts
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self, state: State, logger: Logger) -> None:
        del state, logger  # unused
        if self._file is not None:
            self._file.close()
            self._file = None


def _is_scalar(value: Any) -> bool:
    """Numbers and one-element tensors; images, tables and strings are not metrics the report plots."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)
