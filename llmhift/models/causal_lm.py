"""What every llmhift causal LM shares: next-token targets, the loss, eval metrics, the FLOP count,
and the way back from Composer's DDP wrapper to the model."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import Metric

from llmhift.labels import IGNORE_INDEX  # the datasets write it too: a base-layer name, not the model's

__all__ = [
    "IGNORE_INDEX",
    "LOSS_BALANCES",
    "TaskLoss",
    "CE_METRIC",
    "next_token_targets",
    "task_targets",
    "causal_lm_loss",
    "batch_loss",
    "build_task_loss",
    "eval_metrics",
    "transformer_flops_per_batch",
    "unwrap_model",
]

# The name of the token cross-entropy among the eval metrics, and so in Composer's logged key.
CE_METRIC = "LanguageCrossEntropy"


def next_token_targets(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Targets aligned with the logits: position t predicts token t+1.

    Batches follow the Hugging Face convention (``labels`` aligned with ``input_ids``, -100 where no
    loss is wanted); without ``labels`` every next token counts. The last position has nothing to
    predict, so it is ignored.
    """
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"]
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets  # (B, T)


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the tokens that are not ignored (fp32 softmax whatever the logits' dtype)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),  # (B*T, V)
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


LOSS_BALANCES = ("token", "task", "focal", "self_paced")


class TaskLoss:
    """The training loss over several tasks (MFTCoder's balancing), exact over a whole global batch.

    Every mode weighs the token losses ``l_i`` of task ``t`` by one coefficient per task:
    ``loss = sum_t c_t * sum_{i in t} f(l_i)`` over the global batch (all micro-batches, all ranks):

    * ``token``: ``c_t = 1 / N`` (``N`` response tokens in all), ``f(l) = l``: the plain token mean.
    * ``task``: ``c_t = 1 / (K * N_t)`` over the ``K`` tasks present in the global batch, ``N_t`` the
      task's tokens there: the mean of per-task token means, so a task with long answers does not
      dominate (MFTCoder's data-balanced loss).
    * ``focal``: as ``task`` with ``f(l) = (1 - exp(-l))^gamma * l``, the focal loss of Lin et al.
      (arXiv:1708.02002) on each token's probability ``p = exp(-l)``: tokens the model already
      predicts well count less. ``gamma = 0`` is ``task``.
    * ``self_paced``: ``c_t = w_t / (N_t * sum_{s present} w_s)`` with task weights ``w`` that the
      task balance callback sets from the tasks' convergence (see
      :func:`llmhift.callbacks.task_balance.convergence_weights`); uniform ``w`` is ``task``.

    Why the callback: ``N_t`` and ``K`` are counts over the whole global batch, which no micro-batch
    sees. The task balance callback counts them on the full batch before its first micro-batch
    (all-reduced over ranks) and calls :meth:`begin_batch`. Composer then scales each micro-batch's
    loss by ``micro rows / global rows`` (its sample weighting and DDP's mean over ranks), so
    :meth:`loss` returns ``global rows / micro rows`` times the micro-batch's part of the sum: the
    gradient is exactly the global batch's. ``token`` needs no counts (the usual per-micro-batch mean)
    but still records per-task train losses.

    Args:
        tasks (Sequence[str]): the task names, in ``domain_idx`` order.
        mode (str): one of :data:`LOSS_BALANCES`. Default: ``token``.
        gamma (float): the focal exponent. Default: ``2.0``.
    """

    def __init__(self, tasks: Sequence[str], mode: str = "token", gamma: float = 2.0) -> None:
        if mode not in LOSS_BALANCES:
            raise ValueError(f"loss_balance: {mode!r} is not one of {LOSS_BALANCES}")
        if gamma < 0:
            raise ValueError(f"focal_gamma: {gamma} must be >= 0")
        self.tasks, self.mode, self.gamma = list(tasks), mode, float(gamma)
        K = len(self.tasks)
        self.weights = torch.ones(K, dtype=torch.float64)  # (K,) self_paced's w; the callback sets them
        self._coefficients: torch.Tensor | None = None  # (K,) c_t of the current global batch
        self._global_rows = 0
        self.sums = torch.zeros(K, dtype=torch.float64)  # (K,) this rank's token-loss sums in this batch
        self.counts = torch.zeros(K, dtype=torch.int64)  # (K,) and token counts, for per-task train losses

    def begin_batch(self, task_tokens: torch.Tensor, global_rows: int) -> None:
        """The global batch's response tokens per task ``(K,)`` and rows, counted over all ranks."""
        tokens = task_tokens.to(torch.float64).cpu()
        present = tokens > 0
        w = self.weights * present
        self._coefficients = torch.where(present, w / (w.sum() * tokens.clamp(min=1)), torch.zeros_like(w))
        self._global_rows = int(global_rows)
        self.sums.zero_()
        self.counts.zero_()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, task_idx: torch.Tensor) -> torch.Tensor:
        """The micro-batch's loss (see the class docstring); records per-task token-loss sums."""
        B, T = targets.shape
        token_loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(B, T)  # (B, T), 0 where ignored
        valid = targets != IGNORE_INDEX  # (B, T)
        rows = token_loss.sum(dim=1)  # (B,)
        tasks = task_idx.to(torch.long).cpu()
        self.sums.index_add_(0, tasks, rows.detach().double().cpu())
        self.counts.index_add_(0, tasks, valid.sum(dim=1).cpu())
        if self.mode == "token":
            return token_loss.sum() / valid.sum()
        if self._coefficients is None:
            raise RuntimeError(f"loss_balance={self.mode!r} needs the per-task token counts of each global batch: "
                               "add llmhift.callbacks.TaskBalanceCallback() to the Trainer's callbacks")
        if self.mode == "focal":
            token_loss = (1.0 - torch.exp(-token_loss)) ** self.gamma * token_loss  # (B, T), 0 where ignored
            rows = token_loss.sum(dim=1)  # (B,)
        c = self._coefficients.to(device=rows.device, dtype=rows.dtype)[task_idx.to(rows.device).long()]  # (B,)
        return (c * rows).sum() * (self._global_rows / B)


def build_task_loss(tasks: Sequence[str], mode: str = "token", gamma: float = 2.0) -> TaskLoss | None:
    """A model's :class:`TaskLoss` for data with ``tasks``; ``None`` (the plain token mean) without tasks."""
    if not tasks:
        if mode != "token":
            raise ValueError(f"loss_balance: {mode!r} balances tasks, but the model was given none; give the "
                             "instruction data tasks (dataset.tasks or dataset.task_names) or use 'token'")
        return None
    return TaskLoss(tasks, mode, gamma)


def batch_loss(logits: torch.Tensor, batch: Mapping[str, torch.Tensor], task_loss: TaskLoss | None) -> torch.Tensor:
    """A model's training loss: the token mean, or ``task_loss``'s over the batch's ``domain_idx`` (its tasks)."""
    targets = next_token_targets(batch)  # (B, T)
    if task_loss is None:
        return causal_lm_loss(logits, targets)
    if "domain_idx" not in batch:
        raise KeyError(f"the model was built with tasks {task_loss.tasks}, but the train batch has no domain_idx (B,); "
                       "give the instruction loader dataset.tasks or dataset.task_names")
    return task_loss.loss(logits, targets, batch["domain_idx"])


def task_targets(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The response tokens of each row that are learned, ``(B,)``: what :class:`TaskLoss` counts."""
    return (next_token_targets(batch) != IGNORE_INDEX).sum(dim=1)


def eval_metrics() -> dict[str, Metric]:
    """Token cross-entropy and perplexity, named as Composer logs them."""
    return {
        CE_METRIC: LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
        "LanguagePerplexity": LanguagePerplexity(ignore_index=IGNORE_INDEX),
    }


def transformer_flops_per_batch(
    matmul_params: int, n_layers: int, d_model: int, input_ids: torch.Tensor
) -> int:
    """Training FLOPs of one batch, the count SpeedMonitor turns into MFU.

    6 FLOPs per matmul parameter per token (2 forward, 4 backward), plus the attention scores and
    their weighted sum, 12 * layers * d_model * seq^2 per sequence (forward and backward, no causal
    discount, as the usual MFU convention counts it).
    """
    batch_size, seq_len = input_ids.shape
    dense = 6 * matmul_params * batch_size * seq_len
    attention = 12 * n_layers * d_model * seq_len * seq_len * batch_size
    return dense + attention


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model a callback reads (``mask_source``, ``config``, its units) from ``state.model``.

    Under DDP Composer's ``state.model`` is the ``DistributedDataParallel`` wrapper, holding the model as
    ``.module``; FSDP2 shards the model in place, and a single process uses it as it is. Checked by type,
    not by a ``module`` attribute, which a model of one's own may well have."""
    return model.module if isinstance(model, DistributedDataParallel) else model
