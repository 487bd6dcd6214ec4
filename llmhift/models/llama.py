"""The LLaMA-family decoder (MHA and GQA) as a Composer model, with an optional seam for structural masks."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from composer.models import ComposerModel
from torch.utils.checkpoint import checkpoint
from torchmetrics import Metric

from llmhift.models.causal_lm import (
    batch_loss,
    build_task_loss,
    eval_metrics,
    transformer_flops_per_batch,
)
from llmhift.models.metrics import domain_metrics, update_llm_metric

__all__ = [
    "LlamaConfig",
    "LlamaModel",
    "ComposerLlama",
    "MASK_NAMES",
    "MASK_SOURCE_PREFIX",
    "RUN_SETTINGS",
    "architecture",
    "same_value",
    "rope_inverse_frequencies",
]

ATTN_IMPLS = ("sdpa", "eager", "flash_attn")
ROPE_TYPES = ("default", "linear", "llama3")
# LlamaConfig fields that say how a run computes, not what the weights are: a checkpoint never decides
# them for a later run (a stored config's flash_attn or recomputation was another run's hardware choice),
# and a run config may differ from its checkpoint in them.
RUN_SETTINGS = ("attn_impl", "activation_checkpointing", "init_std")

# Structural masks the forward understands, and the shape of each (L layers, H query heads,
# I intermediate channels, d hidden). `layer` acts as both `head_layer` and `mlp`.
MASK_NAMES = ("head", "head_layer", "intermediate", "mlp", "hidden", "layer")
# Where ComposerLlama keeps its mask module (``self.mask_source``), hence the prefix of the L0 masks' keys
# in a checkpoint's ``state.model``: the converters tell a pruning checkpoint by it.
MASK_SOURCE_PREFIX = "mask_source."


@dataclass
class LlamaConfig:
    """Shape and numerics of a LLaMA-family decoder.

    ``head_dim`` defaults to ``d_model // n_heads`` but is kept separate because pruning the hidden
    size leaves the head size alone (LLaMA-2-7B pruned to d_model 2560 keeps head_dim 128).
    ``rope_scaling`` takes the Hugging Face dict (``rope_type`` ``linear`` or ``llama3``).
    ``layers_without_attn`` / ``layers_without_mlp`` list layers whose attention / MLP sublayer was
    pruned away entirely (their residual branch is gone); Hugging Face's LLaMA cannot express them.
    """

    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int = 11008
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attn_impl: str = "sdpa"
    activation_checkpointing: bool = False
    init_std: float = 0.02
    layers_without_attn: list[int] = dataclasses.field(default_factory=list)
    layers_without_mlp: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim explicitly"
                )
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} "
                "(each key/value head serves a whole group of query heads)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={self.attn_impl!r} is not one of {ATTN_IMPLS}")
        rope_type = self.rope_type
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported; use one of {ROPE_TYPES}")
        for key in ("layers_without_attn", "layers_without_mlp"):
            layers = list(getattr(self, key))
            if any(not 0 <= i < self.n_layers for i in layers) or len(set(layers)) != len(layers):
                raise ValueError(f"{key}={layers} must list distinct layer indices in 0..{self.n_layers - 1}")
            setattr(self, key, sorted(layers))

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "LlamaConfig":
        """Builds a config, naming any key that is not a field (a typo must not pass silently)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; allowed: {sorted(names)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def architecture(values: Mapping[str, Any]) -> dict[str, Any]:
    """What the weights are, from a model section, a stored model config or a ``to_dict()``: its
    LlamaConfig fields except RUN_SETTINGS (a yaml section's ``name``, ``pretrained`` and ``l0_module``
    drop out too). The one rule by which a run config and a checkpoint's config are compared."""
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    return {k: v for k, v in values.items() if k in fields and k not in RUN_SETTINGS}


def same_value(a: Any, b: Any) -> bool:
    """Whether two config values agree: lists as sets (``layers_without_*`` and ``pruning_modules``: order
    carries nothing), everything else by ``==`` (``1e5 == 100000`` and ``True == true`` alike)."""
    if isinstance(a, list) and isinstance(b, list):
        return sorted(a) == sorted(b)
    return a == b


def rope_inverse_frequencies(config: LlamaConfig, device: torch.device | None = None) -> torch.Tensor:
    """Rotary inverse frequencies, with the context-extension rescaling of ``rope_scaling`` applied."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)  # (hd/2,)
    rope_type = config.rope_type
    if rope_type == "linear":
        return inv_freq / config.rope_scaling["factor"]
    if rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band between
        # the two cut-offs blends linearly in 1/wavelength so no frequency jumps.
        scaling = config.rope_scaling
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        original_context = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        slowed = torch.where(wavelength > original_context / low, inv_freq / factor, inv_freq)
        blend = (original_context / wavelength - low) / (high - low)
        blended = (1 - blend) * slowed / factor + blend * slowed
        in_band = (wavelength >= original_context / high) & (wavelength <= original_context / low)
        return torch.where(in_band, blended, slowed)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates pairs (i, i + hd/2): the half-split layout Hugging Face LLaMA weights are stored in."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RMSNorm(nn.Module):
    """Root-mean-square norm; under a hidden mask the mean runs over the kept dimensions only."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, hidden_mask: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if hidden_mask is None:
            variance = x.pow(2).mean(-1, keepdim=True)
            return self.weight * (x * torch.rsqrt(variance + self.eps)).to(dtype)
        # Pruned dimensions must not dilute the statistic: after physical pruning they are gone.
        kept = (hidden_mask != 0).to(x.dtype)  # (d,)
        variance = (x.pow(2) @ kept).unsqueeze(-1) / kept.sum().clamp(min=1)  # (B, T, 1); a matvec, not a mask pass
        weight = self.weight * hidden_mask.to(self.weight.dtype)  # the gate folds into the (d,) weight
        return weight * (x * torch.rsqrt(variance + self.eps)).to(dtype)


def _flash_attn_func():
    if importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "attn_impl='flash_attn' needs the flash-attn package: pip install 'llmhift[gpu]' "
            "(CUDA only), or use attn_impl='sdpa', which also runs flash kernels on GPU"
        )
    from flash_attn import flash_attn_func

    return flash_attn_func


class Attention(nn.Module):
    """Causal self-attention with grouped key/value heads (MHA when n_kv_heads == n_heads)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.attn_impl = config.attn_impl
        self.wq = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=False)
        self._flash = _flash_attn_func() if self.attn_impl == "flash_attn" else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        head_mask: torch.Tensor | None = None,
        out_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = self._attend(q, k, v)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*hd)
        if head_mask is None and out_scale is None:
            return self.wo(y)
        # Masks scale wo's columns (heads) and rows (hidden, sublayer gate): a weight-sized product
        # instead of activation-sized ones; the gradients reach the masks all the same.
        column = None if head_mask is None else head_mask.repeat_interleave(self.head_dim)  # (H*hd,)
        return F.linear(y, _scale_weight(self.wo.weight, out_scale, column))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        group = self.n_heads // self.n_kv_heads
        if self.attn_impl == "sdpa":
            # Repeating the key/value heads beats `enable_gqa=True`, which torch 2.7 serves with the
            # slow math kernel on CPU (5x slower measured); the fused kernels then see plain MHA.
            if group > 1:
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, T, hd)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.attn_impl == "flash_attn":
            if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
                raise RuntimeError(
                    f"attn_impl='flash_attn' runs on CUDA in bf16/fp16 only (got {q.device}, {q.dtype}); "
                    "use precision amp_bf16 on a GPU, or attn_impl='sdpa'"
                )
            # flash-attn wants (B, T, H, hd) and handles grouped heads itself.
            out = self._flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            return out.transpose(1, 2)
        # eager: the textbook computation, kept as the reference the fused paths are tested against.
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, T, hd)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, T)
        T = q.size(-2)
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class MLP(nn.Module):
    """SwiGLU feed-forward; the intermediate mask acts on the gated product, before the down projection."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.w_gate = nn.Linear(config.d_model, config.intermediate_size, bias=False)
        self.w_up = nn.Linear(config.d_model, config.intermediate_size, bias=False)
        self.w_down = nn.Linear(config.intermediate_size, config.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, intermediate_mask: torch.Tensor | None = None, out_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = F.silu(self.w_gate(x)) * self.w_up(x)  # (B, T, I)
        if intermediate_mask is None and out_scale is None:
            return self.w_down(h)
        return F.linear(h, _scale_weight(self.w_down.weight, out_scale, intermediate_mask))


class Block(nn.Module):
    """One decoder layer: pre-norm attention then pre-norm MLP, each added to the residual stream."""

    def __init__(self, config: LlamaConfig, has_attn: bool = True, has_mlp: bool = True) -> None:
        super().__init__()
        # A sublayer pruned away entirely has no weights; its residual branch adds nothing.
        self.attn_norm = RMSNorm(config.d_model, config.rms_norm_eps) if has_attn else None
        self.attn = Attention(config) if has_attn else None
        self.mlp_norm = RMSNorm(config.d_model, config.rms_norm_eps) if has_mlp else None
        self.mlp = MLP(config) if has_mlp else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        masks: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if masks is None:
            if self.attn is not None:
                x = x + self.attn(self.attn_norm(x), cos, sin)
            if self.mlp is not None:
                x = x + self.mlp(self.mlp_norm(x))
            return x
        hidden = masks.get("hidden")
        if self.attn is not None:
            scale = _product(masks.get("head_layer"), hidden)
            x = x + self.attn(self.attn_norm(x, hidden), cos, sin, masks.get("head"), scale)
        if self.mlp is not None:
            scale = _product(masks.get("mlp"), hidden)
            x = x + self.mlp(self.mlp_norm(x, hidden), masks.get("intermediate"), scale)
        return x


def _product(*factors: torch.Tensor | None) -> torch.Tensor | None:
    """The product of the given gates (scalars and (d,) vectors), or None when there are none."""
    present = [f for f in factors if f is not None]
    if not present:
        return None
    out = present[0]
    for factor in present[1:]:
        out = out * factor
    return out


def _scale_weight(weight: torch.Tensor, rows: torch.Tensor | None, columns: torch.Tensor | None) -> torch.Tensor:
    """weight (out, in) scaled per output row (a scalar or (out,)) and per input column ((in,))."""
    if rows is not None:
        weight = weight * (rows.to(weight.dtype)[:, None] if rows.dim() else rows.to(weight.dtype))
    if columns is not None:
        weight = weight * columns.to(weight.dtype)[None, :]
    return weight


def _layer_masks(masks: Mapping[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """The masks one layer needs; `layer` folds into both sublayer gates."""
    per_layer: dict[str, torch.Tensor] = {}
    for name in ("head", "head_layer", "intermediate", "mlp"):
        if name in masks:
            per_layer[name] = masks[name][layer]
    if "layer" in masks:
        gate = masks["layer"][layer]
        for name in ("head_layer", "mlp"):
            per_layer[name] = per_layer[name] * gate if name in per_layer else gate
    if "hidden" in masks:
        per_layer["hidden"] = masks["hidden"]
    return per_layer


class LlamaModel(nn.Module):
    """Token embeddings, decoder blocks, final norm and LM head; returns logits.

    ``masks`` (a dict keyed by ``MASK_NAMES``) scales heads, channels, sublayers and hidden
    dimensions. Without masks the forward is a plain LLaMA with no extra work.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(
            Block(config, i not in config.layers_without_attn, i not in config.layers_without_mlp)
            for i in range(config.n_layers)
        )
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def rope_tables(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions 0..seq_len-1, fp32, recomputed per call: a few thousand
        elements, and no buffer that would need re-initialising after meta-device construction."""
        inv_freq = rope_inverse_frequencies(self.config, device)
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # (T, hd/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
        return angles.cos(), angles.sin()

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """Composer's FSDP (v1 and v2 both ask the ComposerModel's children) shards each decoder block as
        its own unit, so that one block's weights are gathered at a time rather than the whole model's."""
        return isinstance(module, Block)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        """The modules ``fsdp_config.activation_checkpointing`` recomputes in backward: whole blocks, as
        ``model.activation_checkpointing`` does without FSDP (use one of the two, not both)."""
        return isinstance(module, Block)

    def forward(
        self, input_ids: torch.Tensor, masks: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        if masks is not None:
            unknown = set(masks) - set(MASK_NAMES)
            if unknown:
                raise ValueError(f"unknown mask name(s) {sorted(unknown)}; expected some of {MASK_NAMES}")
        x = self.tok_embeddings(input_ids)  # (B, T, d)
        hidden = masks.get("hidden") if masks is not None else None
        if hidden is not None:
            x = x * hidden.to(x.dtype)
        cos, sin = self.rope_tables(input_ids.size(1), input_ids.device)
        recompute = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.layers):
            layer_masks = _layer_masks(masks, i) if masks is not None else None
            if recompute:
                x = checkpoint(block, x, cos, sin, layer_masks, use_reentrant=False)
            else:
                x = block(x, cos, sin, layer_masks)
        x = self.norm(x, hidden)
        weight = self.tok_embeddings.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, weight)  # (B, T, V)


class ComposerLlama(ComposerModel):
    """A LLaMA-family decoder for Composer's Trainer: next-token loss, eval metrics and MFU.

    Args:
        config (LlamaConfig | dict): the model shape; a dict is validated key by key.
        mask_source (nn.Module, optional): a module whose ``forward()`` returns the structural masks
            (a dict keyed by ``MASK_NAMES``). It is a submodule, so its parameters are trained and
            checkpointed with the model; pruning plugs its L0 module in here. Default: ``None``
            (a plain LLaMA, no masking cost).
        train_metrics (bool): also compute the eval metrics on training batches (a cost every
            batch). Default: ``False``.
        eval_domains (Sequence[str]): domain names, in ``domain_idx`` order, for per-domain eval
            cross-entropy (``<domain>_LanguageCrossEntropy``). Default: none.
        init_device (str | torch.device, optional): where the decoder's weights are created.
            ``"meta"`` gives shapes without memory or initialisation, for weights that are loaded
            (``load_state_dict(..., assign=True)``) or broadcast by FSDP afterwards. The mask source
            and the metrics are not affected. Default: ``None`` (the current default device, randomly
            initialised with ``init_std``).
        tasks (Sequence[str]): instruction tasks, in ``domain_idx`` order: the loss is then a
            :class:`~llmhift.models.causal_lm.TaskLoss` and records per-task train losses. Default: none.
        loss_balance (str): how tasks are weighed, one of ``LOSS_BALANCES`` (see ``TaskLoss``).
            Default: ``token``.
        focal_gamma (float): the ``focal`` exponent. Default: ``2.0``.

    Batches are dicts with ``input_ids`` (B, T) and optionally ``labels`` aligned with them (-100
    where no loss is wanted). Every sequence is treated as causal and unpadded: pad on the right
    and mask the padding in ``labels``.

    Example:
        >>> from composer import Trainer
        >>> model = ComposerLlama(LlamaConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4,
        ...                                   intermediate_size=128))
        >>> trainer = Trainer(model=model, train_dataloader=loader, max_duration="10ba")  # doctest: +SKIP
    """

    def __init__(
        self,
        config: LlamaConfig | Mapping[str, Any],
        mask_source: nn.Module | None = None,
        train_metrics: bool = False,
        eval_domains: Sequence[str] = (),
        init_device: str | torch.device | None = None,
        tasks: Sequence[str] = (),
        loss_balance: str = "token",
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.config = config if isinstance(config, LlamaConfig) else LlamaConfig.from_dict(config)
        with torch.device(init_device) if init_device is not None else contextlib.nullcontext():
            self.model = LlamaModel(self.config)
        self.mask_source = mask_source
        self.train_metrics = eval_metrics() if train_metrics else {}
        self.eval_metrics = {**eval_metrics(), **domain_metrics(eval_domains)}
        self.task_loss = build_task_loss(tasks, loss_balance, focal_gamma)
        # The input embedding is a lookup, not a matmul; a tied table is still the LM head's matmul.
        embedding = self.model.tok_embeddings.weight.numel()
        total = sum(p.numel() for p in self.model.parameters())
        self._matmul_params = total if self.config.tie_word_embeddings else total - embedding

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        masks = self.mask_source() if self.mask_source is not None else None
        return self.model(batch["input_ids"], masks=masks)

    def loss(self, outputs: torch.Tensor, batch: Mapping[str, Any], *args, **kwargs) -> torch.Tensor:
        return batch_loss(outputs, batch, self.task_loss)

    def eval_forward(self, batch: Mapping[str, Any], outputs: torch.Tensor | None = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: Mapping[str, Any], outputs: torch.Tensor, metric: Metric) -> None:
        update_llm_metric(metric, batch, outputs)

    def flops_per_batch(self, batch: Mapping[str, Any]) -> int:
        return transformer_flops_per_batch(
            self._matmul_params,
            self.config.n_layers,
            self.config.n_heads * self.config.head_dim,  # attention width; differs from d_model once pruned
            batch["input_ids"],
        )
