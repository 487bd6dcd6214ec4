"""Per-domain eval cross-entropy for multi-domain data, the signal dynamic batch loading reads."""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from llmhift.models.causal_lm import CE_METRIC, IGNORE_INDEX, next_token_targets

__all__ = ["DomainCrossEntropy", "domain_metrics", "update_llm_metric", "DOMAIN_METRIC_SUFFIX"]

# Composer logs each metric under its dict key, as ``metrics/<eval label>/<key>``; the suffix keeps
# the per-domain keys next to Composer's own ``LanguageCrossEntropy`` in every logger.
DOMAIN_METRIC_SUFFIX = f"_{CE_METRIC}"


class DomainCrossEntropy(Metric):
    """Token-weighted next-token cross-entropy over the samples of one domain.

    Sheared-LLaMA's dynamic batch loading moves the data mix towards the domains whose eval loss is
    furthest above its reference, so this number has to be right across ranks and batches. The
    reference implementation averaged per-rank means (wrong whenever ranks hold different numbers of
    a domain's tokens) and divided by zero for a domain absent from a batch. Here the states are a
    sum of token losses and a token count, both reduced with ``sum`` across ranks before the single
    division in :meth:`compute`: the result equals a one-process computation over all the eval data.

    A domain that never appears in the whole eval (an ``eval_subset_num_batches`` that stops before
    its samples, say) has no loss. :meth:`compute` returns NaN for it, as Composer's own
    ``LanguageCrossEntropy`` does without tokens, and warns once, naming the domain. Composer logs every
    metric's value, so NaN is the closest it gets to logging nothing: the JSON-lines logger records it
    as null, plots leave a gap, and the report skips it, where a 0.0 would read as a perfect loss.
    Callers that act on the value must check :meth:`has_data` first and skip the domain.

    Args:
        domain_idx (int): the index of this domain in the list of domain names, the value batches
            carry in ``domain_idx``.
        domain (str): the domain's name, for messages.
        ignore_index (int): target value that carries no loss. Default: ``IGNORE_INDEX`` (-100).
        **kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).

    States:
        sum_loss (float64 scalar): summed token cross-entropy; float64 so that thousands of batch
            sums accumulate without fp32 drift.
        total_tokens (int64 scalar): non-ignored target tokens of this domain's samples.

    Example:
        >>> metric = DomainCrossEntropy(1, "code")
        >>> logits, targets = torch.randn(4, 8, 16), torch.randint(16, (4, 8))
        >>> metric.update(logits, targets, domain_idx=torch.tensor([0, 1, 1, 2]))
        >>> loss = metric.compute() if metric.has_data() else None
    """

    full_state_update = False  # update() never reads the accumulated states
    is_differentiable = False
    higher_is_better = False

    sum_loss: torch.Tensor
    total_tokens: torch.Tensor

    def __init__(self, domain_idx: int, domain: str, ignore_index: int = IGNORE_INDEX, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if domain_idx < 0:
            raise ValueError(f"domain_idx={domain_idx} for domain {domain!r} must be >= 0")
        self.domain_idx = domain_idx
        self.domain = domain
        self.ignore_index = ignore_index
        self._warned_empty = False
        self.add_state("sum_loss", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_tokens", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor, domain_idx: torch.Tensor) -> None:
        """Adds the loss and token count of this domain's samples in the batch.

        Args:
            logits (Tensor): ``(B, T, V)``, or a mapping holding them under ``"logits"``.
            target (Tensor): ``(B, T)``, already aligned with the logits (``next_token_targets``).
            domain_idx (Tensor): ``(B,)``, the domain of each sample.
        """
        if isinstance(logits, Mapping):
            logits = logits["logits"]
        if logits.dim() != 3 or target.shape != logits.shape[:2] or domain_idx.shape != logits.shape[:1]:
            raise ValueError(
                f"expected logits (B, T, V), target (B, T) and domain_idx (B,); got {tuple(logits.shape)}, "
                f"{tuple(target.shape)} and {tuple(domain_idx.shape)}"
            )
        rows = domain_idx == self.domain_idx  # (B,)
        if not bool(rows.any()):
            return  # nothing of this domain here: the states stay exactly as they were
        # Only this domain's rows are gathered, so D domain metrics together cost about one full
        # cross-entropy. detach: train metrics get the training logits, and the states must not
        # hold the graph alive.
        logits = logits.detach()[rows]  # (b, T, V)
        target = target[rows]  # (b, T)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(),  # (b*T, V) fp32 softmax whatever the dtype
            target.reshape(-1),
            ignore_index=self.ignore_index,
            reduction="sum",
        )
        self.sum_loss += loss.double()
        self.total_tokens += (target != self.ignore_index).sum()

    def compute(self) -> torch.Tensor:
        """Mean token loss over everything seen on all ranks, or NaN (with a warning) if there is none.

        A collective under distributed training: every rank must call it.
        """
        if int(self.total_tokens) == 0:
            if not self._warned_empty:
                self._warned_empty = True
                # stacklevel 3: torchmetrics wraps compute(), so 2 would name its wrapper, not the caller.
                warnings.warn(
                    f"DomainCrossEntropy: domain {self.domain!r} (domain_idx={self.domain_idx}) had no "
                    "target tokens in this evaluation, so it has no loss (NaN, logged as null). Check has_data() "
                    "before using it, or let the evaluation reach samples of every domain.",
                    stacklevel=3,
                )
            return torch.tensor(float("nan"), device=self.sum_loss.device)
        # float32 like Composer's LanguageCrossEntropy, so both sit side by side in every logger.
        return (self.sum_loss / self.total_tokens).float()

    def has_data(self) -> bool:
        """Whether any rank has seen a target token of this domain since the last reset.

        Reads the states as :meth:`compute` does, so it is a collective under distributed training
        (every rank must call it) and agrees with the NaN that compute returns for an empty domain.
        """
        # The states may already be synced (compute with should_unsync=False); syncing twice raises.
        with self.sync_context(should_sync=self._to_sync and not self._is_synced, should_unsync=True):
            return int(self.total_tokens) > 0


def domain_metrics(domains: Sequence[str], ignore_index: int = IGNORE_INDEX) -> dict[str, DomainCrossEntropy]:
    """One :class:`DomainCrossEntropy` per domain, keyed ``<domain>_LanguageCrossEntropy``.

    The position of a name in ``domains`` is the ``domain_idx`` batches carry for it, so this must be
    the same list the data pipeline used. Composer logs each as
    ``metrics/<eval label>/<domain>_LanguageCrossEntropy`` and stores it in
    ``state.eval_metric_values["<domain>_LanguageCrossEntropy"]``.
    """
    names = list(domains)
    duplicates = sorted({d for d in names if names.count(d) > 1})
    if duplicates:
        raise ValueError(f"domain names must be unique (each is a metric key); repeated: {duplicates}")
    return {
        f"{domain}{DOMAIN_METRIC_SUFFIX}": DomainCrossEntropy(i, domain, ignore_index=ignore_index)
        for i, domain in enumerate(names)
    }


def update_llm_metric(metric: Metric, batch: Mapping[str, Any], logits: torch.Tensor) -> None:
    """Updates any llmhift LM metric from a batch: the body of a model's ``update_metric``.

    Per-domain metrics also get ``batch["domain_idx"]``; every other metric gets the logits and
    the next-token targets, as Composer's ``LanguageCrossEntropy`` expects. To wire it in::

        def get_metrics(self, is_train=False):
            return {**eval_metrics(), **domain_metrics(self.domains)}

        def update_metric(self, batch, outputs, metric):
            update_llm_metric(metric, batch, outputs)
    """
    targets = next_token_targets(batch)  # (B, T)
    if isinstance(metric, DomainCrossEntropy):
        if "domain_idx" not in batch:
            raise KeyError(
                f"the eval loader must yield domain_idx (B,) to compute per-domain metric for "
                f"{metric.domain!r}; batch keys are {sorted(batch)}. Use a multi-domain eval set, or "
                "leave domain_metrics() out of get_metrics()"
            )
        metric.update(logits, targets, batch["domain_idx"])
    else:
        metric.update(logits, targets)
