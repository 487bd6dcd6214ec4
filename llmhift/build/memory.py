"""Per-GPU memory of a training run, estimated before launch: weights, gradients, optimizer state,
activations, and the transient working set on top of them.

``python train.py YAML --dry-run --world-size 8`` prints it. Everything here is arithmetic on counts
(parameters, shapes, micro-batch, sharding), so the estimate for a 7B yaml takes no memory itself.

Where the bytes go (per GPU, W ranks):

* weights: the stored parameters, fp32 (4 B) unless HiFT stores them in ``param_dtype`` (2 B) and keeps
  an fp32 master copy of the active group only. ``amp_bf16`` keeps fp32 weights: autocast computes
  in bf16 from them (its bf16 copies are saved for backward, so they count under activations).
* gradients: one fp32 gradient per trained parameter (FSDP's sharded gradient is fp32 too).
* optimizer: per trained parameter tensor, what its optimizer keeps
  (:func:`llmhift.build.optimizers.optimizer_state_bytes`): AdamW two fp32 moments and a step, SGD
  with momentum one buffer (plain SGD nothing), Adagrad one sum and a step, Lion one moment,
  Adafactor a value per row and per column of each matrix, bitsandbytes' 8-bit ones a byte per value
  and moment plus an fp32 absmax per 256 values.
* FSDP2 (train.py's default, :func:`llmhift.build.parallel.fsdp_version`) divides weights, gradients and
  optimizer state by W whatever the ``sharding_strategy``: ``SHARD_GRAD_OP`` (``reshard_after_forward:
  false``) only keeps each block's gathered weights from forward to backward (more ``working``).
  Under FSDP1 (``FSDP_VERSION=1``) ``FULL_SHARD`` divides all three, ``SHARD_GRAD_OP`` gradients and
  optimizer state, ``NO_SHARD`` (and no FSDP) nothing.
* HiFT (``callbacks.hift``): gradients and optimizer state of the largest group trained at once (the
  other groups' optimizer state waits in host memory, reported as ``host``; nothing with
  ``optimizer_state: reset``).
* activations: what autograd saves in one micro-batch's forward, and the logits the Trainer holds
  until backward; see :func:`activation_bytes`.
* working: transient peaks that add to the above at some point of the step: the weights FSDP
  gathers (and their unsharded gradients), and the larger of one checkpointed block recomputed in
  backward and the gradient buffers of the loss (freed before the first block is rebuilt).
* distillation (``callbacks.distillation``): the teacher's fp32 weights (sharded like the student's
  under FSDP2) under weights; under working its logits, the KL's gradient buffer (both micro-batch x
  seq x vocab in the compute dtype), one fp32 KL chunk (8 x chunk_tokens x vocab) and the teacher
  blocks FSDP gathers: an upper bound, as the teacher's logits are freed before backward.

Not counted: the CUDA context and allocator fragmentation (typically 1-3 GB), data-loader buffers,
communication buckets, and eval (which saves no activations).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Collection, Optional, Sequence

from torch import nn

from llmhift.build.config import ConfigError
from llmhift.build.optimizers import optimizer_state_bytes
from llmhift.build.parallel import RESHARD_AFTER_FORWARD, fsdp_version, parallelism_config
from llmhift.build.trainer import TEACHER_KEY, build_callbacks, build_teacher
from llmhift.callbacks.distillation import DistillationCallback
from llmhift.callbacks.hift import HiFTCallback
from llmhift.callbacks.hift.schedule import find_units
from llmhift.models.hf_causal_lm import D_MODEL_NAMES, N_LAYERS_NAMES, ComposerHFCausalLM
from llmhift.models.l0_module import count_params  # the dry run's source and target sizes
from llmhift.models.llama import LlamaConfig

__all__ = [
    "ModelShape",
    "Masking",
    "Activations",
    "MemoryEstimate",
    "FSDP1_STRATEGIES",
    "Sharding",
    "activation_bytes",
    "state_bytes",
    "estimate_run",
    "default_world_size",
    "parse_memory",
    "what_fits",
    "count_params",
]

GiB = 2**30
FP32, HALF, INDEX = 4, 2, 8  # bytes of an fp32 value, a bf16/fp16 value, an int64 index
FSDP1_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")  # FSDP2's are llmhift.build.trainer'


@dataclass(frozen=True)
class ModelShape:
    """The dimensions activation memory depends on."""

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_llama(cls, config: LlamaConfig) -> "ModelShape":
        return cls(config.d_model, config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim,
                   config.intermediate_size, config.vocab_size)

    @classmethod
    def from_hf(cls, config: Any) -> "ModelShape":
        """A Hugging Face decoder config: LLaMA-family names (llama, mistral, qwen2, ...), else GPT-2's
        (``n_embd``, ``n_layer``, ``n_head``, ``n_inner``) or OPT's (``ffn_dim``). The activation formula
        is LLaMA's (RMSNorm, SwiGLU), so for other families the figure is an approximation. Raises
        ValueError naming a dimension the config gives under none of these names."""
        d = _hf_dimension(config, D_MODEL_NAMES)
        heads = _hf_dimension(config, ("num_attention_heads", "n_head"))
        intermediate_names = ("intermediate_size", "ffn_dim", "n_inner")
        # GPT-2 and GPT-J declare n_inner (GPT-Neo intermediate_size) as None for their 4 x d MLP.
        default = 4 * d if any(hasattr(config, name) for name in intermediate_names) else None
        return cls(d, _hf_dimension(config, N_LAYERS_NAMES), heads,
                   getattr(config, "num_key_value_heads", None) or heads,
                   getattr(config, "head_dim", None) or d // heads,
                   _hf_dimension(config, intermediate_names, default), _hf_dimension(config, ("vocab_size",)))

    @property
    def attn_width(self) -> int:
        return self.n_heads * self.head_dim

    def matrices(self) -> dict[str, int]:
        """Elements of each weight matrix of one block."""
        d, kv = self.d_model, self.n_kv_heads * self.head_dim
        return {"wq": d * self.attn_width, "wk": d * kv, "wv": d * kv, "wo": self.attn_width * d,
                "w_gate": d * self.intermediate_size, "w_up": d * self.intermediate_size,
                "w_down": self.intermediate_size * d}


def _hf_dimension(config: Any, names: Sequence[str], default: Optional[int] = None) -> int:
    """The first of ``names`` that ``config`` sets, else ``default``."""
    value = next((v for v in (getattr(config, name, None) for name in names) if v is not None), default)
    if value is None:
        raise ValueError(f"{type(config).__name__}: sets none of {list(names)}, a dimension the estimate needs")
    return int(value)


@dataclass(frozen=True)
class Masking:
    """What L0 pruning masks add to a forward (``model.l0_module``).

    ``wo_rows``/``wo_columns`` (and the ``w_down`` pair): whether a mask scales that matrix's output
    rows (head_layer/mlp, layer, hidden gates) or input columns (head, intermediate masks). ``hidden``:
    the embedding output is masked. ``entries``: mask table entries (the L0 parameters).
    """

    wo_rows: bool
    wo_columns: bool
    w_down_rows: bool
    w_down_columns: bool
    hidden: bool
    entries: int

    @classmethod
    def from_modules(cls, pruning_modules: Sequence[str], entries: int) -> "Masking":
        modules = set(pruning_modules)
        gates = {"layer", "hidden"}
        return cls(wo_rows=bool(modules & (gates | {"head_layer"})), wo_columns="head" in modules,
                   w_down_rows=bool(modules & (gates | {"mlp"})), w_down_columns="intermediate" in modules,
                   hidden="hidden" in modules, entries=entries)


@dataclass(frozen=True)
class Activations:
    saved: int  # saved for backward by one micro-batch's forward, plus the logits
    recompute: int  # one checkpointed block's saved tensors, rebuilt during backward (0 without)
    logits_grad: int  # the loss backward's gradient buffers around the logits


def _norm_bytes(d: int, residual: int, compute: int, *, input_grad: bool, weight_grad: bool,
                consumers: int) -> int:
    """One RMSNorm per token. It computes in fp32 (``x.float()``: x itself when the residual is fp32,
    a new copy when it is bf16) and returns ``weight * normed``. ``consumers``: the matmuls reading
    its output that need their input (trained ones)."""
    total = 0
    if input_grad:
        total += FP32 * d + FP32  # x (saved by pow and by the multiply with rsqrt) and rsqrt
    if weight_grad:
        total += residual * d  # normed, cast back to the residual dtype, for the weight's gradient
    if consumers and residual == compute:
        total += compute * d  # the output, saved once by all the matmuls that read it
    elif consumers:
        total += consumers * compute * d  # under autocast each matmul casts it and saves its copy
    return total


def _block_bytes_per_token(shape: ModelShape, residual: int, compute: int, trained: bool, input_grad: bool) -> int:
    """Saved bytes of one decoder block per token (sdpa attention, SwiGLU MLP). ``trained``: its
    weights get gradients; ``input_grad``: its input needs one (false only for the lowest trained
    block of a HiFT group above a frozen embedding)."""
    d, attn, inter = shape.d_model, shape.attn_width, shape.intermediate_size
    norms = (_norm_bytes(d, residual, compute, input_grad=input_grad, weight_grad=trained, consumers=3 * trained)
             + _norm_bytes(d, residual, compute, input_grad=True, weight_grad=trained, consumers=2 * trained))
    # sdpa saves q, k, v (k and v repeated to all query heads under GQA) and its output, which wo
    # reads as a view, plus one fp32 log-sum-exp per head.
    attention = 4 * attn * compute + FP32 * shape.n_heads
    # gate (silu's input), silu(gate), up, and their product (w_down's input); a frozen w_down does
    # not need its input.
    mlp = (4 if trained else 3) * inter * compute
    return norms + attention + mlp


def _block_weight_bytes(shape: ModelShape, weight: int, compute: int, masking: Optional[Masking]) -> int:
    """Weight-sized tensors one block saves: autocast's bf16 copies of fp32 weights, and the masked
    copies of wo / w_down that pruning multiplies (``weight * rows * columns``, each factor saved)."""
    casts = compute != weight  # autocast casts every weight it multiplies and saves the copy
    total = 0
    for name, size in shape.matrices().items():
        rows = getattr(masking, f"{name}_rows", False) if masking else False
        columns = getattr(masking, f"{name}_columns", False) if masking else False
        if rows and columns:
            total += size * weight  # weight * rows, saved by the multiply with the columns
        if rows or columns or casts:
            total += size * compute  # what the matmul saves: the masked product (or its cast)
    return total


def activation_bytes(
    shape: ModelShape,
    micro_batch: int,
    seq_len: int,
    *,
    weight: int = FP32,
    amp: bool = False,
    checkpointing: bool = False,
    masking: Optional[Masking] = None,
    trained_units: Optional[Collection[str]] = None,
    tied_embeddings: bool = False,
) -> Activations:
    """Bytes autograd saves in one training forward of ComposerLlama (sdpa attention).

    ``weight`` is the byte size of the weights the forward computes with (2 when FSDP gathers them in
    bf16 or HiFT stores them in bf16); ``amp`` runs the matmuls in bf16 under autocast. The residual
    stream has the dtype of the embedding weights, the matmul outputs bf16 under ``amp``.

    Per decoder block and token (d_model d, H query heads of head_dim hd, intermediate I; r, c the
    byte sizes of the residual stream and of the matmul outputs), what each op saves for backward:

    * each RMSNorm: its input (fp32; when r = 2, the fp32 copy ``x.float()``) 4d, rsqrt 4 B,
      ``normed`` rd for the weight's gradient, and its output cd, shared by the matmuls that read it;
      under autocast with an fp32 residual each matmul casts the output itself, so attention's norm
      saves three bf16 copies (wq, wk, wv) and the MLP's two (w_gate, w_up);
    * attention: sdpa's q, k, v, output (4 H hd c; GQA keys and values are repeated to H heads
      before sdpa, the un-repeated ones are not saved) and an fp32 log-sum-exp per head (4H); wo
      reads sdpa's output as a view; rotary embedding saves only the cos/sin tables;
    * MLP: w_gate's output (silu's input), silu's output, w_up's output and their product, 4 I c.

    With fp32 and no autocast that is (6d + 4 H hd + 4I) x 4 B + 4H + 8 B per token and block.
    Around the blocks: the token ids (8 B) for the embedding's gradient, the final norm, the logits
    (V c, held by the Trainer until backward), ``log_softmax``'s fp32 output (4V) and the targets
    (8 B). Masks (pruning) add the embedding output before the hidden mask (rd), the masked copies
    of wo and w_down per block (:func:`_block_weight_bytes`) and two fp32 values per mask entry.
    On CPU this matches ``saved_tensors_hooks`` to a few scalars per layer, fp32 and autocast
    alike (tests/test_memory_estimate.py); on CUDA, flash attention saves the same tensors.

    A pruned model's layers without an attention or MLP sublayer (``layers_without_attn``) are
    counted whole: an upper bound.

    ``checkpointing`` (``model.activation_checkpointing``, or ``fsdp_config.activation_checkpointing``
    which wraps the same blocks): a block saves only its input (rd per token); backward rebuilds
    one block at a time, which ``recompute`` reports.

    ``trained_units`` (HiFT's active group; default: all): names among ``embedding``, ``block.<i>``,
    ``norm``, ``head``. Blocks below the lowest trained unit save nothing (no gradient flows there);
    frozen blocks above it save only what their input's gradient needs: no matmul inputs, no
    ``normed``, three MLP tensors.
    """
    s, tokens = shape, micro_batch * seq_len
    r, c = weight, HALF if amp else weight  # residual stream, matmul outputs
    blocks = [f"block.{i}" for i in range(s.n_layers)]
    units = set(trained_units) if trained_units is not None else {"embedding", *blocks, "norm", "head"}
    embedding = "embedding" in units
    lowest = 0 if embedding else next((i for i, b in enumerate(blocks) if b in units), s.n_layers)
    rope = 2 * seq_len * s.head_dim  # the cos and sin tables (T, hd)

    saved = recompute = 0
    for i in range(lowest, s.n_layers):
        trained = blocks[i] in units
        full = _block_bytes_per_token(s, r, c, trained, input_grad=embedding or i > lowest) * tokens
        full += _block_weight_bytes(s, weight, c, masking if trained else None)
        full += rope * c if c != FP32 else 0  # bf16 copies of the tables, made in every block
        if checkpointing:
            saved += r * s.d_model * tokens  # the block's input
            recompute = max(recompute, full)
        else:
            saved += full
    if lowest < s.n_layers and (c == FP32 or checkpointing):
        saved += rope * FP32  # the fp32 tables, made once per forward (saved as a block input)

    if embedding:
        saved += INDEX * tokens
    if masking is not None:
        saved += 2 * FP32 * masking.entries  # the sampled gates: sigmoid's output, the clamp's input
        saved += r * s.d_model * tokens if masking.hidden else 0  # the embedding output, before its mask
    head = "head" in units or (tied_embeddings and embedding)
    saved += _norm_bytes(s.d_model, r, c, input_grad=embedding or lowest < s.n_layers,
                         weight_grad="norm" in units, consumers=int(head)) * tokens
    if c != weight:
        saved += s.vocab_size * s.d_model * c  # autocast's copy of the head (or the tied embedding)
    saved += (c + FP32) * s.vocab_size * tokens + INDEX * tokens  # logits, log_softmax, targets
    # backward of the loss: the gradient at the log-softmax output and at its input (fp32 each)
    return Activations(saved=saved, recompute=recompute, logits_grad=2 * FP32 * s.vocab_size * tokens)


@dataclass(frozen=True)
class Sharding:
    """How FSDP spreads one rank's bytes, as train.py sets it up (:mod:`llmhift.build.trainer`)."""

    version: int  # 1 or 2, llmhift.build.parallel.fsdp_version()
    strategy: str  # fsdp_config.sharding_strategy
    reshard_after_forward: bool  # a block's gathered weights are freed after its forward
    world_size: int

    @classmethod
    def of(cls, config: Any, world_size: int) -> Optional["Sharding"]:
        """None without ``fsdp_config``; ValueError for a strategy the run would refuse."""
        if not config.fsdp_config:
            return None
        strategy = config.fsdp_config.get("sharding_strategy", "FULL_SHARD")
        if fsdp_version() == 1:
            if strategy not in FSDP1_STRATEGIES:
                raise ValueError(f"fsdp_config.sharding_strategy: no memory model for {strategy!r} under FSDP1; "
                                 f"known: {FSDP1_STRATEGIES}")
            return cls(1, strategy, strategy == "FULL_SHARD", world_size)
        # The FSDP2 config the run builds: its error for a strategy FSDP2 lacks, a reshard_after_forward
        # the yaml sets over the strategy's.
        fsdp2 = parallelism_config(config)["fsdp"]
        return cls(2, strategy, bool(fsdp2.reshard_after_forward), world_size)

    @property
    def weight_ranks(self) -> int:
        """Ranks the stored weights are split over."""
        return self.world_size if self.version == 2 or self.strategy == "FULL_SHARD" else 1

    @property
    def state_ranks(self) -> int:
        """Ranks the gradients and optimizer state are split over."""
        return self.world_size if self.version == 2 or self.strategy != "NO_SHARD" else 1

    @property
    def label(self) -> str:
        if self.version == 2 and self.reshard_after_forward != RESHARD_AFTER_FORWARD[self.strategy]:
            return f"FSDP2 {self.strategy} (reshard_after_forward: {str(self.reshard_after_forward).lower()})"
        return f"FSDP{self.version} {self.strategy}"


def state_bytes(params: int, trained_params: int, *, optimizer: int, weight: int = FP32, master_params: int = 0,
                weight_ranks: int = 1, state_ranks: int = 1) -> dict[str, int]:
    """Bytes of weights, gradients and optimizer state per GPU.

    ``params``: every parameter's elements, stored in ``weight`` bytes each; ``trained_params``: those
    with gradients and optimizer state on the GPU at once (all of them, or the largest HiFT group);
    ``optimizer``: the bytes of their optimizer state, unsharded; ``master_params``: fp32 master copies (HiFT with ``param_dtype``);
    ``weight_ranks``/``state_ranks``: the ranks FSDP splits the weights / the gradients and optimizer
    state over (:class:`Sharding`).
    """
    return {
        "weights": math.ceil((params * weight + master_params * FP32) / weight_ranks),
        "gradients": math.ceil(trained_params * FP32 / state_ranks),
        "optimizer": math.ceil(optimizer / state_ranks),
    }


@dataclass
class MemoryEstimate:
    """The estimate for one rank, in bytes, with what each figure assumes."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    working: int
    host: int = 0
    accumulating: bool = True  # gradients kept across micro-batches: they coexist with the activations
    notes: dict[str, str] = dataclasses.field(default_factory=dict)
    heading: str = ""

    @property
    def total(self) -> int:
        """The peak. With one micro-batch per step, backward frees each block's activations as it fills
        that block's gradients, so the two peak apart (measured on an H200: bench/gpu_suite.py); with
        gradient accumulation, the gradients of the earlier micro-batches wait through the next forward."""
        transient = self.activations + self.working
        held = self.gradients + transient if self.accumulating else max(transient, self.gradients)
        return self.weights + self.optimizer + held

    def lines(self) -> list[str]:
        rows = [self.heading]
        for key in ("weights", "gradients", "optimizer", "activations", "working", "total"):
            value = self.total if key == "total" else getattr(self, key)
            rows.append(f"  {key:<12}{value / GiB:8.2f} GiB  {self.notes.get(key, '')}".rstrip())
        if self.host:
            rows.append(f"  {'host':<12}{self.host / GiB:8.2f} GiB  {self.notes.get('host', '')}".rstrip())
        return rows


def default_world_size() -> int:
    """``WORLD_SIZE`` from the environment (what Composer's launcher sets), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _hift_groups(model: nn.Module, hift: HiFTCallback) -> list[tuple[list[nn.Parameter], list[str]]]:
    """Each set of units HiFT trains at once (a cycled group plus ``always_active``): (its parameters,
    its unit names), planned by the callback's own schedule, whose errors are the run's."""
    units = find_units(model)
    plan = hift.plan(units)
    named = dict(model.named_parameters())
    sets = [plan.trained_with(g) for g in range(len(plan.groups))]
    return [([named[name] for u in trained for name in units[u][1]], [units[u][0] for u in trained])
            for trained in sets]


def _numel(params: Sequence[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def _blocks(model: nn.Module) -> list[int]:
    """Elements of each decoder block: FSDP shards every block as its own unit (the model's
    ``fsdp_wrap_fn``), the blocks HiFT finds too."""
    named = dict(model.named_parameters())
    return [sum(named[n].numel() for n in names) for unit, names in find_units(model)
            if unit.startswith("block.")]


def estimate_run(config: Any, model: nn.Module, shape: ModelShape, world_size: int,
                 micro_batch: Optional[int] = None, seq_len: Optional[int] = None) -> MemoryEstimate:
    """The estimate for a TrainConfig and its model, built on the meta device (only counts are read).

    ``model`` is what the optimizer trains: ComposerLlama with its L0 module, or the Hugging Face
    model that ComposerHFCausalLM wraps; ``shape`` its dimensions (the activation formula is
    ComposerLlama's; Hugging Face LLaMA-family models save the same tensors). ``micro_batch`` and
    ``seq_len`` replace the yaml's (:func:`what_fits` searches over them). Raises ValueError for
    settings it has no model for or the run would refuse.
    """
    optimizer = config.optimizer.name
    sharding = Sharding.of(config, world_size)
    weight_ranks, state_ranks = (sharding.weight_ranks, sharding.state_ranks) if sharding else (1, 1)
    fsdp = dict(config.fsdp_config or {})
    amp = config.precision != "fp32"
    hift = next((c for c in build_callbacks(config) if isinstance(c, HiFTCallback)), None)
    stored = HALF if hift is not None and hift.param_dtype else FP32
    computed = stored
    if amp and fsdp and str(fsdp.get("mixed_precision", "DEFAULT")).upper() in ("DEFAULT", "PURE"):
        computed = HALF  # Composer's FSDP gathers the weights in the autocast dtype
    micro = config.device_train_microbatch_size
    micro = config.global_train_batch_size // world_size if micro in (None, "auto") else micro  # auto: at most that
    # A micro-batch what_fits tries is counted as accumulating: smaller than the batch it does, and the
    # search stays monotonic (a larger one is never cheaper).
    accumulating = micro_batch is not None or micro < config.global_train_batch_size // world_size
    micro = micro_batch or micro
    seq_len = seq_len or config.train_loader.dataset.max_seq_len or config.model.get("max_seq_len")
    if not seq_len:
        raise ValueError("train_loader.dataset.max_seq_len: needed for the activation estimate")
    checkpointing = bool(config.model.get("activation_checkpointing") or fsdp.get("activation_checkpointing"))
    l0 = getattr(model, "mask_source", None)
    masking = None if l0 is None else Masking.from_modules(l0.pruning_modules, _numel(list(l0.z_loga.values())))
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    kwargs = dict(weight=computed, amp=amp, checkpointing=checkpointing, tied_embeddings=tied)

    params = list(model.parameters())
    if hift is None:
        trained, others, master = params, [], 0
        acts = activation_bytes(shape, micro, seq_len, masking=masking, **kwargs)
    else:
        groups = _hift_groups(model, hift)
        trained = max((g for g, _ in groups), key=_numel)
        mine = {id(p) for p in trained}
        # parked between their turns; with optimizer_state: reset their state is dropped instead
        others = [] if hift.optimizer_state == "reset" else list(
            {id(p): p for g, _ in groups for p in g if id(p) not in mine}.values())
        master = _numel(trained) if stored == HALF else 0
        acts = max((activation_bytes(shape, micro, seq_len, trained_units=units, **kwargs) for _, units in groups),
                   key=lambda a: a.saved + a.recompute)
    moments = optimizer_state_bytes(config.optimizer, [p.shape for p in trained])
    state = state_bytes(_numel(params), _numel(trained), optimizer=moments, weight=stored, master_params=master, weight_ranks=weight_ranks, state_ranks=state_ranks)
    gathered = _gathered_bytes(sharding, _blocks(model), computed, _numel(params)) if sharding else 0
    # The loss backward's buffers are freed before the first block is rebuilt: the larger one counts.
    working = gathered + max(acts.recompute, acts.logits_grad)
    # parked HiFT state, sharded like its parameters under FSDP2
    host = math.ceil(optimizer_state_bytes(config.optimizer, [p.shape for p in others]) / state_ranks)
    distill = next((c for c in build_callbacks(config) if isinstance(c, DistillationCallback)), None)
    teacher = None if distill is None else _teacher_bytes(config, distill, sharding, micro * seq_len,
                                                          shape.vocab_size, amp, computed)
    if teacher is not None:
        state["weights"] += teacher["weights"]
        working += teacher["working"]
    estimate = MemoryEstimate(**state, activations=acts.saved, working=working, host=host, accumulating=accumulating)

    where = f"{sharding.label} over {world_size} ranks" if sharding else f"no FSDP, {world_size} rank(s)"
    estimate.heading = (f"memory per GPU (estimate): {where}, {config.precision}, {optimizer}, micro-batch "
                        f"{micro} x {seq_len} tokens{', activation checkpointing' if checkpointing else ''}")
    split = f" / {world_size} ranks" if state_ranks > 1 else ""
    l0_count = _numel(list(l0.parameters())) if l0 is not None else 0
    scope = f"HiFT's largest group, {_numel(trained):,}" if hift is not None else f"{_numel(trained):,}"
    kept = sharding is not None and not sharding.reshard_after_forward and sharding.strategy != "NO_SHARD"
    estimate.notes = {
        "total": ("gradients kept through the step's micro-batches, on top of the activations" if estimate.accumulating
                  else "one micro-batch per step: the larger of gradients and activations + working"),
        "weights": (f"{_numel(params):,} parameters" + (f" ({l0_count:,} of them L0 masks)" if l0_count else "")
                    + f", {'bf16' if stored == HALF else 'fp32'}" + (split if weight_ranks > 1 else "")
                    + (f", + fp32 master of {master:,}" if master else "")),
        "gradients": f"fp32, {scope} parameters{split}",
        "optimizer": f"{optimizer}'s state, {scope} parameters{split}",
        "activations": (f"saved for backward, {'bf16' if computed == HALF or amp else 'fp32'} compute"
                        f"{', masked weights' if masking else ''}{', HiFT worst group' if hift is not None else ''}"
                        ", and the logits"),
        "working": (("weights FSDP gathers" + (" (every block, kept from forward to backward)" if kept else "")
                     + " and their gradients, " if gathered else "")
                    + ("one block recomputed" if acts.recompute > acts.logits_grad else "the logits' gradient")),
        "host": ("optimizer state of the other HiFT groups, in "
                 + ("offload_dir files, not memory" if hift is not None and hift.offload_dir else "CPU memory")
                 + (split if host else "")),
    }
    if teacher is not None:
        estimate.notes["weights"] += f"; + teacher {teacher['params']:,}, fp32" + (split if weight_ranks > 1 else "")
        estimate.notes["working"] += "; + the teacher's logits, the KL's gradient buffer, one KL chunk" + (
            " and the teacher blocks FSDP gathers" if sharding else "")
    return estimate


def _teacher_bytes(config: Any, distill: DistillationCallback, sharding: Optional[Sharding], tokens: int, vocab: int,
                   amp: bool, computed: int) -> Optional[dict[str, int]]:
    """The distillation teacher's weights and working memory per rank, from its config alone (built on
    the meta device); None when its checkpoint is not on this machine (a dry run away from the cluster)."""
    path = config.callbacks["distillation"]["teacher"]
    if not os.path.exists(path):
        print(f"note: {TEACHER_KEY}: {path} does not exist here: the estimate leaves the teacher out")
        return None
    teacher = build_teacher(config, path, init_device="meta")
    params = _numel(list(teacher.parameters()))
    logits = tokens * vocab * (HALF if amp else FP32)  # the teacher's, and the KL's gradient buffer
    chunk = 8 * distill.chunk_tokens * vocab * FP32
    blocks = _blocks(teacher.model if isinstance(teacher, ComposerHFCausalLM) else teacher)  # as estimate_run's
    gathered = (params - sum(blocks) + 2 * max(blocks, default=0)) * computed if sharding else 0  # no gradients
    ranks = sharding.weight_ranks if sharding else 1
    return {"params": params, "weights": math.ceil(params * FP32 / ranks), "working": 2 * logits + chunk + gathered}


def _gathered_bytes(sharding: Sharding, blocks: Sequence[int], computed: int, n_params: int) -> int:
    """Unsharded weights FSDP holds at its peak, with their unsharded gradients before the
    reduce-scatter. Each decoder block is its own FSDP unit; the rest of the model (embeddings, final
    norm, head, L0 masks) is the root unit, gathered through the whole forward (around the blocks)
    and again through the whole backward."""
    if sharding.version == 1 and sharding.strategy == "NO_SHARD":
        return n_params * computed if computed != FP32 else 0  # FSDP's low-precision copy
    if sharding.version == 1 and sharding.strategy == "SHARD_GRAD_OP":
        return 2 * n_params * computed  # gathered from forward to the end of backward, and the gradients
    block = max(blocks, default=0)
    outer = n_params - sum(blocks)
    if not sharding.reshard_after_forward:
        # FSDP2 keeps every block gathered from its forward to its backward: at the start of backward
        # all weights are, with the gradients of the root unit and of the block computing.
        return n_params * computed + (outer + block) * computed
    # the root unit, the block computing and the next one prefetched; the gradients of the root unit
    # and of one block
    return (outer + 2 * block) * computed + (outer + block) * computed


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(text: str, key: str = "--gpu-memory") -> int:
    """Bytes of a size such as ``24GiB``, ``80GB`` or ``49140MiB``; a ConfigError naming ``key`` otherwise."""
    number = text.strip().rstrip("bBiIkKmMgGtT")
    unit = text.strip()[len(number):].upper()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key}: {text!r} is not a memory size; give a positive number with a unit, e.g. 24GiB "
                          "or 80GB (units: " + ", ".join(k.replace("I", "i") for k in _UNITS) + ")")
    return int(value * _UNITS[unit])


FITS_CAP = 2**20  # the search stops here: a micro-batch or a sequence this long is not a real setting


def _largest(fits: Callable[[int], bool]) -> int:
    """The largest n >= 1 with ``fits(n)`` (monotone: true up to some n), 0 when even 1 does not fit;
    ``FITS_CAP`` when everything up to it fits."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= FITS_CAP and fits(high):
        low, high = high, high * 2
    if high > FITS_CAP:
        return FITS_CAP
    while high - low > 1:  # fits(low), not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def max_positions(model: nn.Module) -> Optional[int]:
    """The longest sequence the model's position range allows (HF ``max_position_embeddings``, or
    ComposerLlama's ``max_seq_len``); None when the config names neither."""
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "max_seq_len", None)


def what_fits(config: Any, model: nn.Module, shape: ModelShape, world_size: int,
              gpu_bytes: int) -> tuple[int, int, int]:
    """(seq_len, largest micro-batch at the yaml's seq_len, longest sequence at micro-batch 1) whose
    estimated total (:func:`estimate_run`) is at most ``gpu_bytes``; 0 where nothing fits, ``FITS_CAP``
    where the search stopped. The sequence never exceeds :func:`max_positions`: a longer one fits in
    memory but not in the model. Estimates only: the CUDA context and fragmentation are not counted."""
    def total(micro: int, seq: Optional[int] = None) -> int:
        with contextlib.redirect_stdout(io.StringIO()):  # the dry run printed the estimate's notes once already
            return estimate_run(config, model, shape, world_size, micro_batch=micro, seq_len=seq).total
    seq_len = config.train_loader.dataset.max_seq_len or config.model.get("max_seq_len")
    limit = max_positions(model) or FITS_CAP
    batch = _largest(lambda m: total(m) <= gpu_bytes)
    longest = _largest(lambda t: t <= limit and total(1, t) <= gpu_bytes)
    return seq_len, batch, longest
