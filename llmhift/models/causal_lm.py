"""What every llmhift causal LM shares: next-token targets, the loss, eval metrics, the FLOP count,
and the way back from Composer's DDP wrapper to the model."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import Metric

from llmhift.labels import IGNORE_INDEX  # the datasets write it too: a base-layer name, not the model's

__all__ = [
    "IGNORE_INDEX",
    "CE_METRIC",
    "next_token_targets",
    "causal_lm_loss",
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
