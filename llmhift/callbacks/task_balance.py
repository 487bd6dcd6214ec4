"""Multi-task loss balancing: per-task token counts of each global batch, per-task train losses, and
the self-paced (convergence-balancing) task weights."""

from __future__ import annotations

import json
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from composer import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from llmhift.loggers import EVAL_LABEL
from llmhift.models.causal_lm import TaskLoss, task_targets, unwrap_model
from llmhift.models.metrics import DOMAIN_METRIC_SUFFIX

__all__ = ["TaskBalanceCallback", "convergence_weights", "TRAIN_TASK_LOSS_KEY", "TASK_WEIGHT_KEY"]

# The logged keys (the table in the class docstring); ``{}`` is the task.
TRAIN_TASK_LOSS_KEY = "metrics/train/{}" + DOMAIN_METRIC_SUFFIX
TASK_WEIGHT_KEY = "metrics/train/{}_task_weight"


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _slope(y: np.ndarray) -> float:
    """Least-squares slope of ``y`` against 0, 1, ..., len(y) - 1."""
    x = np.arange(len(y), dtype=np.float64)
    return float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())


def convergence_weights(history: Sequence[Sequence[float]], window: int = 5, tau: float = 5.0) -> list[float]:
    """Task weights from the eval-loss history, CoBa's rule (Gong et al., "CoBa: Convergence Balancer
    for Multitask Finetuning of Large Language Models", EMNLP 2024, arXiv:2410.06741, Sec. 3; MFTCoder's
    ``coba`` loss mode, the self-paced loss of its README).

    ``history[n][k]`` is task ``k``'s eval loss at evaluation ``n`` divided by its first one (K tasks).
    ``a_k(n)`` is the least-squares slope of task ``k``'s last ``window`` points up to ``n``, and
    ``m(n)`` the slope of the per-evaluation maximum over tasks; ``M`` is the number of slopes in the
    last ``window`` evaluations (``n`` itself included). At the latest evaluation ``n``:

    * relative convergence ``RCS = softmax_k(K * a_k(n) / sum_j |a_j(n)|)``: a task converging more
      slowly than the others (its slope less negative) gets more weight;
    * absolute convergence ``ACS = softmax_k(-M * a_k(n) / sum_{last M} |a_k(.)|)``: a task whose loss
      turns upward against its own recent slopes (diverging) gets less;
    * divergence factor ``DF = min(M * softmax(-tau * M * m / sum_{last M} |m|)_n, 1)`` over the last
      ``M`` values of ``m``: near 1 while the tasks still converge (RCS leads), smaller once the
      worst task's loss flattens or rises (ACS takes over);
    * ``w = softmax_k(K * (DF * RCS + (1 - DF) * ACS))``.

    Fewer than 3 evaluations (no two slopes) give uniform weights. A zero denominator (flat losses)
    counts as 1.
    """
    L = np.asarray(history, dtype=np.float64)  # (n, K)
    n, K = L.shape
    if n < 3:
        return [1.0 / K] * K
    worst = L.max(axis=1)  # (n,)
    slopes, worst_slopes = [], []  # for each evaluation from the second on
    for end in range(2, n + 1):
        part = slice(max(0, end - window), end)
        slopes.append([_slope(L[part, k]) for k in range(K)])
        worst_slopes.append(_slope(worst[part]))
    a = np.asarray(slopes[-window:])  # (M, K)
    m = np.asarray(worst_slopes[-window:])  # (M,)
    M = len(m)

    def nonzero(x: float) -> float:
        return x if x > 0 else 1.0

    rcs = _softmax(K * a[-1] / nonzero(np.abs(a[-1]).sum()))
    acs = _softmax(-M * a[-1] / np.array([nonzero(v) for v in np.abs(a).sum(axis=0)]))
    df = min(M * _softmax(-tau * M * m / nonzero(np.abs(m).sum()))[-1], 1.0)
    return _softmax(K * (df * rcs + (1 - df) * acs)).tolist()


class TaskBalanceCallback(Callback):
    """Gives the model's :class:`~llmhift.models.causal_lm.TaskLoss` what no micro-batch sees.

    Before each batch it counts the learned response tokens of every task over the full batch on all
    ranks (one all-reduce of ``K + 1`` numbers) and hands them to the loss, so that the ``task``,
    ``focal`` and ``self_paced`` losses are exact over the global batch whatever the micro-batching
    and the number of ranks. After each batch it logs each task's token-mean train loss (summed over
    ranks; a task absent from the batch is not logged, neither NaN nor 0). With ``self_paced`` it
    re-weights the tasks after each evaluation by :func:`convergence_weights` of the per-task eval
    losses; the loss history and weights are its checkpointed state, so a resumed run continues
    with the same weights.

    Args:
        eval_label (str): the evaluator whose ``<task>_LanguageCrossEntropy`` ``self_paced`` reads.
            Default: ``eval``.
        window (int): evaluations per slope fit (``self_paced``). Default: ``5``.
        tau (float): the divergence factor's temperature (``self_paced``). Default: ``5.0``.

    Example:
        >>> model = ComposerLlama(config, tasks=["code", "math"], loss_balance="task")  # doctest: +SKIP
        >>> trainer = Trainer(model=model, train_dataloader=loader, callbacks=[TaskBalanceCallback()],
        ...                   max_duration="100ba")  # doctest: +SKIP

    Logged metrics:

    +-------------------------------------------------+--------------------------------------------+
    | Key                                             | Logged value                               |
    +=================================================+============================================+
    | ``metrics/train/<task>_LanguageCrossEntropy``   | the task's token-mean loss in the batch    |
    +-------------------------------------------------+--------------------------------------------+
    | ``metrics/train/<task>_task_weight``            | ``self_paced``: the task's weight, after   |
    |                                                 | each evaluation                            |
    +-------------------------------------------------+--------------------------------------------+
    """

    def __init__(self, eval_label: str = EVAL_LABEL, window: int = 5, tau: float = 5.0) -> None:
        if window < 2:
            raise ValueError(f"window: {window} must be >= 2 (a slope needs two evaluations)")
        self.eval_label, self.window, self.tau = eval_label, window, float(tau)
        self.history: list[list[float]] = []  # per evaluation: each task's eval loss / its first one
        self.first: list[float] | None = None
        self.weights: list[float] | None = None
        self._loss: TaskLoss | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        del logger  # unused
        loss = getattr(unwrap_model(state.model), "task_loss", None)
        if not isinstance(loss, TaskLoss):
            raise ValueError(f"TaskBalanceCallback: the model {type(unwrap_model(state.model)).__name__} has no "
                             "task_loss (llmhift.models.causal_lm.TaskLoss); build it with tasks=[...], e.g. "
                             "ComposerLlama(config, tasks=names, loss_balance='task'), or drop the callback")
        self._loss = loss
        if self.weights is not None:
            loss.weights = torch.tensor(self.weights, dtype=torch.float64)

    def before_train_batch(self, state: State, logger: Logger) -> None:
        del logger  # unused
        assert self._loss is not None
        batch = state.batch
        if "domain_idx" not in batch:
            raise KeyError(f"TaskBalanceCallback: the train batch has no domain_idx (B,), the task of each row; "
                           f"give the instruction loader dataset.tasks or dataset.task_names (batch keys: {sorted(batch)})")
        K = len(self._loss.tasks)
        counts = torch.zeros(K + 1, dtype=torch.float64)  # (K + 1,) tokens per task, then rows
        counts[:K].index_add_(0, batch["domain_idx"].long().cpu(), task_targets(batch).double().cpu())
        counts[K] = batch["input_ids"].shape[0]
        counts = state.device.tensor_to_device(counts)
        dist.all_reduce(counts, reduce_operation="SUM")
        counts = counts.cpu()
        self._loss.begin_batch(counts[:K], int(counts[K]))

    def batch_end(self, state: State, logger: Logger) -> None:
        assert self._loss is not None
        sums = state.device.tensor_to_device(torch.cat([self._loss.sums, self._loss.counts.double()]))  # (2K,)
        dist.all_reduce(sums, reduce_operation="SUM")
        sums = sums.cpu()
        K = len(self._loss.tasks)
        logger.log_metrics({TRAIN_TASK_LOSS_KEY.format(t): float(sums[k] / sums[K + k])
                            for k, t in enumerate(self._loss.tasks) if sums[K + k] > 0})

    def eval_after_all(self, state: State, logger: Logger) -> None:
        if self._loss is None or self._loss.mode != "self_paced":
            return  # nothing to weigh: an evaluation outside fit (eval-only), or another balance
        metrics = state.eval_metrics.get(self.eval_label, {})
        losses = []
        for task in self._loss.tasks:
            metric = metrics.get(f"{task}{DOMAIN_METRIC_SUFFIX}")
            if metric is None:
                raise KeyError(f"TaskBalanceCallback: the {self.eval_label!r} evaluator has no {task}"
                               f"{DOMAIN_METRIC_SUFFIX}; build the model with eval_domains equal to its tasks")
            has_data = metric.has_data()  # collectives: every rank calls both, for every task
            value = float(metric.compute())
            losses.append(value if has_data else None)
        absent = [t for t, v in zip(self._loss.tasks, losses) if v is None]
        if absent:  # a task without eval tokens has no convergence to compare: the weights stay
            warnings.warn(f"TaskBalanceCallback: task(s) {absent} had no eval tokens, so the self-paced weights stay "
                          "as they were; raise eval_subset_num_batches (-1: the whole eval set) or give the eval "
                          "set samples of every task", stacklevel=2)
            return
        if self.first is None:
            self.first = [v if v > 0 else 1.0 for v in losses]
        self.history.append([v / f for v, f in zip(losses, self.first)])
        self.weights = convergence_weights(self.history, self.window, self.tau)
        self._loss.weights = torch.tensor(self.weights, dtype=torch.float64)
        logger.log_metrics({TASK_WEIGHT_KEY.format(t): w for t, w in zip(self._loss.tasks, self.weights)})

    def state_dict(self) -> dict[str, Any]:
        # JSON strings: a sharded checkpoint flattens nested lists into keys the resuming run lacks.
        return {"history": json.dumps(self.history), "first": json.dumps(self.first),
                "weights": json.dumps(self.weights)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = json.loads(state["history"])
        self.first = json.loads(state["first"])
        self.weights = json.loads(state["weights"])
        if self._loss is not None and self.weights is not None:
            self._loss.weights = torch.tensor(self.weights, dtype=torch.float64)
