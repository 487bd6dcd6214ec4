"""Any transformers causal LM as a ComposerModel that keeps extra batch keys and reports FLOPs."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from composer.models import ComposerModel
from torch import nn
from torchmetrics import Metric
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from llmhift.models.causal_lm import causal_lm_loss, eval_metrics, next_token_targets, transformer_flops_per_batch
from llmhift.models.metrics import domain_metrics, update_llm_metric

__all__ = ["ComposerHFCausalLM", "N_LAYERS_NAMES", "D_MODEL_NAMES"]

# The config attributes that hold the depth and width across HF families (llama, GPT-2, ...); the memory
# estimate reads the same ones.
N_LAYERS_NAMES = ("num_hidden_layers", "n_layer", "num_layers")
D_MODEL_NAMES = ("hidden_size", "n_embd", "d_model")


class ComposerHFCausalLM(ComposerModel):
    """Wraps a ``transformers`` causal LM (LLaMA, Mistral, Qwen2, GPT-2, OPT, GPT-NeoX, ...) for Composer.

    Composer's own ``HuggingFaceModel`` does not fit llmhift's training: it drops the batch keys the
    HF forward does not accept, so a per-sample ``domain_idx`` never reaches the per-domain metrics;
    it updates train metrics on every batch unless told not to, an extra forward-sized cost; and it
    has no ``flops_per_batch``, so :class:`~composer.callbacks.SpeedMonitor` cannot log FLOPs or MFU.
    This wrapper hands the HF model only ``input_ids`` and ``attention_mask``, leaves the rest of
    the batch alone, and computes the loss itself with the next-token convention shared by every
    llmhift model (``labels`` aligned with ``input_ids``, -100 ignored; ``input_ids`` if absent).

    ``forward`` returns the logits ``(B, T, V)``; ``eval_forward`` returns the same.

    Args:
        model (PreTrainedModel): a causal LM, one with an LM head (``AutoModelForCausalLM``).
        tokenizer (PreTrainedTokenizerBase, optional): kept as ``self.tokenizer`` for whoever saves
            the model as an HF checkpoint. Default: ``None``.
        train_metrics (bool, optional): whether to compute the eval metrics on training batches too.
            Default: ``False``.
        eval_domains (Sequence[str], optional): domain names, in ``domain_idx`` order, for per-domain
            eval cross-entropy (``<domain>_LanguageCrossEntropy``). Default: none.

    Attributes:
        matmul_params (int): the parameters that take part in a matmul, counted once at
            construction: all of them except embedding lookups (token, and learned positions such
            as GPT-2's ``wpe``); a token embedding tied to the LM head counts, as the head is a matmul.

    Example:
        >>> import torch
        >>> from composer import Trainer
        >>> from torch.utils.data import DataLoader
        >>> from transformers import GPT2Config
        >>> model = ComposerHFCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
        >>> data = [{"input_ids": torch.randint(100, (16,)), "domain_idx": torch.tensor(0)} for _ in range(8)]
        >>> trainer = Trainer(model=model, train_dataloader=DataLoader(data, batch_size=4), max_duration="2ba")
        >>> trainer.fit()
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
        train_metrics: bool = False,
        eval_domains: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.train_metrics = train_metrics
        self.eval_domains = list(eval_domains)
        self.n_layers = _config_int(model.config, N_LAYERS_NAMES)
        self.d_model = _config_int(model.config, D_MODEL_NAMES)
        # Counted here, not per batch: under FSDP the parameters are flattened and sharded later.
        self.matmul_params = _matmul_param_count(model)
        _mark_blocks_for_fsdp(model)

    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, os.PathLike],
        torch_dtype: Optional[Union[torch.dtype, str]] = None,
        attn_implementation: Optional[str] = None,
        eval_domains: Sequence[str] = (),
        **kwargs: Any,
    ) -> ComposerHFCausalLM:
        """Loads a local HF checkpoint folder (never the Hub); ``kwargs`` go to ``from_pretrained``."""
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"{os.fspath(path)!r} is not a local Hugging Face model folder (no config.json in it); "
                "llmhift never downloads from the Hub, so pass a folder written by save_pretrained."
            )
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype  # transformers >= 4.56 name; `torch_dtype` is deprecated there
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
        return cls(model, eval_domains=eval_domains)

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> ComposerHFCausalLM:
        """A randomly initialized model of the architecture ``config`` names."""
        return cls(AutoModelForCausalLM.from_config(config))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # Only the keys every causal LM takes; labels stay out so that HF skips its own loss.
        # use_cache=False: training never decodes, and the key/value cache would hold memory.
        outputs = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            use_cache=False,
        )
        # peft's prompt and P-tuning put their virtual tokens in front of the input: their positions
        # predict nothing of the batch, so only the last T positions are the batch's logits.
        return outputs.logits[:, -batch["input_ids"].shape[1] :]  # (B, T, V)

    def loss(self, outputs: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return causal_lm_loss(outputs, next_token_targets(batch))

    def eval_forward(
        self, batch: Mapping[str, torch.Tensor], outputs: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        # Composer passes the training forward's logits when it computes train metrics.
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        if is_train and not self.train_metrics:
            return {}
        return {**eval_metrics(), **domain_metrics(self.eval_domains)}

    def update_metric(self, batch: Mapping[str, torch.Tensor], outputs: torch.Tensor, metric: Metric) -> None:
        update_llm_metric(metric, batch, outputs)

    def flops_per_batch(self, batch: Mapping[str, torch.Tensor]) -> int:
        """Training FLOPs of ``batch`` (padding included), which SpeedMonitor turns into FLOP/s and MFU."""
        return transformer_flops_per_batch(self.matmul_params, self.n_layers, self.d_model, batch["input_ids"])


def _mark_blocks_for_fsdp(model: nn.Module) -> None:
    """Composer's FSDP (v1 and v2) asks the ComposerModel's children which submodules to shard as units
    and to recompute with ``fsdp_config.activation_checkpointing``: the decoder layers (LlamaDecoderLayer,
    GPT2Block, ...), which transformers lists as the modules never to split across devices."""
    blocks = frozenset(getattr(model, "_no_split_modules", None) or ())
    model.fsdp_wrap_fn = lambda module: type(module).__name__ in blocks
    model.activation_checkpointing_fn = lambda module: type(module).__name__ in blocks


def _config_int(config: PretrainedConfig, names: Sequence[str]) -> int:
    """The first of ``names`` that ``config`` sets (config attribute names differ between models)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(config).__name__} sets none of {list(names)}; cannot count the model's FLOPs.")


def _matmul_param_count(model: PreTrainedModel) -> int:
    """Parameters excluding embedding lookups; a token embedding tied to the LM head counts once."""
    lookups = list(model.get_input_embeddings().parameters())
    # Learned position (or token type) tables: any other nn.Embedding, OPT's subclass included.
    lookups += [p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()]
    lookup_ids = {id(p) for p in lookups}
    head = model.get_output_embeddings()
    if head is not None:
        lookup_ids -= {id(p) for p in head.parameters()}
    # model.parameters() yields a tied matrix once.
    return sum(p.numel() for p in model.parameters() if id(p) not in lookup_ids)
