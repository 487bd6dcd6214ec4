"""DistillationCallback: logit distillation from a frozen teacher inside a vanilla Composer fit."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from composer import Callback, Logger, State
from composer.core.precision import get_precision_context
from composer.distributed.fsdp2 import prepare_fully_shard
from composer.distributed.fsdp2_utils import generate_composer_model_policy
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config, FSDPConfig
from torch import nn
from torch.distributed.fsdp import FSDPModule

from llmhift.models.causal_lm import IGNORE_INDEX, next_token_targets

__all__ = ["DistillationCallback", "DISTILL_KL", "DISTILL_LM", "DISTILL_TEACHER_CE", "LOSSES", "distillation_loss"]

LOSSES = ("kl", "reverse_kl")
# The keys this callback logs (also read by bench/distillation.py).
DISTILL_KL, DISTILL_LM, DISTILL_TEACHER_CE = "distill/kl", "distill/lm", "distill/teacher_ce"


def _check_settings(temperature: float, alpha: float, loss: str, chunk_tokens: int) -> None:
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"callbacks.distillation.temperature: must be a number > 0, got {temperature!r}")
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"callbacks.distillation.alpha: must be in [0, 1] (the KL's weight), got {alpha!r}")
    if loss not in LOSSES:
        raise ValueError(f"callbacks.distillation.loss: {loss!r} is not one of {LOSSES}")
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"callbacks.distillation.chunk_tokens: must be a positive int, got {chunk_tokens!r}")


def _token_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, reverse: bool) -> torch.Tensor:
    """KL per row of two logit chunks (C, V) -> (C,), on temperature-softened distributions."""
    log_s = F.log_softmax(student / temperature, dim=-1)  # (C, V)
    log_t = F.log_softmax(teacher / temperature, dim=-1)  # (C, V)
    if reverse:  # KL(student || teacher)
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1)  # KL(teacher || student)


class _ChunkedKL(torch.autograd.Function):
    """The weighted KL sum, computed and differentiated one chunk of rows at a time.

    Forward keeps each chunk's gradient (in the student logits' dtype) instead of the fp32
    log-softmaxes autograd would save for every chunk, so neither model's logits ever exist in full
    fp32; backward only scales that buffer. It may be backpropagated once (no ``retain_graph``)."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, temperature: float,
                reverse: bool, chunk: int) -> torch.Tensor:
        grad = torch.zeros_like(student)  # (N, V)
        dtype = weights.dtype
        total = torch.zeros((), dtype=dtype, device=student.device)
        for start in range(0, student.size(0), chunk):
            rows = slice(start, start + chunk)
            with torch.enable_grad():
                piece = student[rows].detach().to(dtype).requires_grad_()  # (C, V)
                part = (_token_kl(piece, teacher[rows].to(dtype), temperature, reverse) * weights[rows]).sum()
                (grad[rows],) = torch.autograd.grad(part, piece)
            total += part.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None, None, None


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 1.0, loss: str = "kl",
                      chunk_tokens: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(``T^2`` x the mean per-token KL, the teacher's mean cross-entropy) over the tokens whose target
    is not ``IGNORE_INDEX``: the tokens the LM loss averages over, so ``alpha`` mixes like with like.

    ``loss="kl"`` is the forward KL(teacher || student) of the temperature-softened distributions
    (Hinton et al.; Minitron's choice): mass-covering, the student is pushed to give probability
    wherever the teacher does, which is what recovering a pruned copy of the teacher needs.
    ``reverse_kl`` is KL(student || teacher), mode-seeking. The ``T^2`` factor keeps the gradient's
    scale independent of the temperature (the softened gradients shrink as ``1/T^2``).

    Differentiable with respect to ``student_logits`` only. Memory on top of the two logit tensors:
    one gradient buffer of the student logits' size and dtype (held until backward, then handed to
    autograd as the logits' gradient) and the fp32 working set of one chunk of ``chunk_tokens`` rows,
    about 8 x chunk_tokens x V x 4 bytes (0.5 GiB at V = 32000 with the default 512; 2 GiB at
    V = 128256, where a smaller chunk may suit), never the full fp32 logits of either model.
    Measured (tests/test_distillation.py): 81 MiB above two bf16 logit tensors of 2048 x 8192
    (32 MiB each) with chunks of 64 rows: the buffer, the logits' gradient and ~16 MiB of chunk.
    """
    vocab = student_logits.size(-1)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"callbacks.distillation: teacher logits {tuple(teacher_logits.shape)} do not match the "
                         f"student's {tuple(student_logits.shape)}; teacher and student must share the tokenizer")
    counted = (targets != IGNORE_INDEX).reshape(-1)  # (N,)
    n = counted.sum().clamp(min=1)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # at least fp32 (float64 stays float64)
    weights = counted.to(dtype) / n  # a mean over the counted tokens
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)  # (N, V) views
    kl = _ChunkedKL.apply(student, teacher.detach(), weights, float(temperature), loss == "reverse_kl", chunk_tokens)
    with torch.no_grad():
        teacher_ce = sum(F.cross_entropy(teacher[s:s + chunk_tokens].to(dtype), targets.reshape(-1)[s:s + chunk_tokens],
                                         ignore_index=IGNORE_INDEX, reduction="sum")
                         for s in range(0, teacher.size(0), chunk_tokens)) / n
    return kl * temperature**2, teacher_ce


class DistillationCallback(Callback):
    """Continued pretraining with a frozen teacher's logits (Minitron-style knowledge distillation).

    At each micro-batch, after the student's LM loss, the teacher runs on the same batch (eval mode,
    no gradient, under the run's precision context) and the loss the Trainer backpropagates becomes
    ``alpha * KL + (1 - alpha) * LM``, both means over the same non-ignored tokens (see
    :func:`distillation_loss` for the KL's direction, the ``T^2`` scaling and the memory it needs).
    ``alpha: 0`` leaves the loss untouched (the run is bit-identical to one without the callback;
    the KL is still computed and logged). Evaluation never calls the teacher: eval metrics, and the
    per-domain losses dynamic loading steers by, stay the student's LM loss.

    The teacher is not part of the student: no optimizer group, no checkpoint entry, and this
    callback keeps no state, so a resumed run equals an uninterrupted one. It may differ from the
    student in width, depth and heads, not in vocabulary. Under FSDP2 it is sharded at FIT_START
    like the student (Composer's own ``prepare_fully_shard``: each block its own unit, the run's
    mesh and mixed precision), never replicated; FSDP1 is refused. Without FSDP it is moved to the
    run's device.

    Args:
        teacher (nn.Module | Callable[[], nn.Module]): a ComposerModel whose ``forward(batch)``
            returns logits (B, T, V) (ComposerLlama, ComposerHFCausalLM), or a function returning
            one, called at FIT_START (train.py passes a loader, so that building the Trainer or a
            dry run reads no teacher weights).
        temperature (float): softens both distributions. Default: ``1.0``.
        alpha (float): weight of the KL; ``1 - alpha`` weighs the LM loss. Default: ``1.0``.
        loss (str): ``kl`` (forward, KL(teacher || student)) or ``reverse_kl``. Default: ``kl``.
        chunk_tokens (int): rows of the flattened logits per KL chunk (memory vs. loop overhead).
            Default: ``512``.

    Example:
        >>> from composer import Trainer
        >>> teacher = ComposerLlama(teacher_config)  # then load its weights
        >>> trainer = Trainer(model=ComposerLlama(student_config), train_dataloader=loader,
        ...                   callbacks=[DistillationCallback(teacher, alpha=0.5)])  # doctest: +SKIP

    +-------------------------+----------------------------------------------------------------+
    | Key                     | Logged value (each batch, mean over micro-batches and ranks)   |
    +=========================+================================================================+
    | ``distill/kl``          | ``T^2`` x KL per token                                         |
    | ``distill/lm``          | the student's LM cross-entropy                                 |
    | ``distill/teacher_ce``  | the teacher's cross-entropy on the same tokens                 |
    +-------------------------+----------------------------------------------------------------+
    """

    def __init__(self, teacher: nn.Module | Callable[[], nn.Module], temperature: float = 1.0, alpha: float = 1.0,
                 loss: str = "kl", chunk_tokens: int = 512) -> None:
        _check_settings(temperature, alpha, loss, chunk_tokens)
        if not isinstance(teacher, nn.Module) and not callable(teacher):
            raise ValueError(f"callbacks.distillation.teacher: needs a model or a function building one, got "
                             f"{type(teacher).__name__}")
        self.teacher = teacher
        self.temperature, self.alpha, self.loss, self.chunk_tokens = float(temperature), float(alpha), loss, chunk_tokens
        self._sums: torch.Tensor | None = None  # per batch: kl, lm, teacher_ce (sample-weighted), samples

    def fit_start(self, state: State, logger: Logger) -> None:
        del logger  # unused
        if isinstance(state.fsdp_config, FSDPConfig):
            raise ValueError("fsdp_config: distillation needs FSDP2 (train.py's default: unset FSDP_VERSION=1; with "
                             "a Trainer of your own, set FSDP_VERSION=2) to shard the teacher like the student")
        if not isinstance(self.teacher, nn.Module):
            self.teacher = self.teacher()
        teacher = self.teacher
        teacher.eval().requires_grad_(False)
        if isinstance(state.fsdp_config, FSDP2Config):
            if not any(isinstance(m, FSDPModule) for m in teacher.modules()):  # a second fit() keeps its shards
                prepare_fully_shard(teacher, state.fsdp_config, state.precision,
                                    generate_composer_model_policy(teacher))
        else:
            state.device.module_to_device(teacher)

    def batch_start(self, state: State, logger: Logger) -> None:
        del state, logger  # unused
        self._sums = None

    def after_loss(self, state: State, logger: Logger) -> None:
        del logger  # unused
        if isinstance(state.loss, Mapping):
            raise ValueError("callbacks.distillation: the loss is already a dict (callbacks.pruning?); distil "
                             "during continued pretraining, after pruning and post-processing")
        assert isinstance(self.teacher, nn.Module)  # built at FIT_START
        with torch.no_grad(), get_precision_context(state.precision, state.precision_config):
            teacher_logits = self.teacher(state.batch)  # (B, T, V)
        for module in self.teacher.modules():
            if isinstance(module, FSDPModule):  # FSDP2 keeps its root unit gathered after forward, for a
                module.reshard()  # backward that never comes here: shard it again (a no-op for the others)
        kl, teacher_ce = distillation_loss(state.outputs, teacher_logits, next_token_targets(state.batch),
                                           self.temperature, self.loss, self.chunk_tokens)
        del teacher_logits  # the KL's gradient is already computed: the teacher's logits can go
        lm = state.loss
        if self.alpha:  # alpha 0 adds nothing to the graph, so the run is the LM-only run bit for bit
            state.loss = self.alpha * kl if self.alpha == 1 else self.alpha * kl + (1 - self.alpha) * lm
        samples = state.batch["input_ids"].size(0)
        values = torch.stack([kl.detach().float(), lm.detach().float(), teacher_ce.float()]) * samples
        step = torch.cat([values, values.new_tensor([samples])])
        self._sums = step if self._sums is None else self._sums + step

    def after_train_batch(self, state: State, logger: Logger) -> None:
        """Logged where Composer logs ``loss/train/total``: at the same step, before the timestamp moves."""
        del state  # unused
        if self._sums is None:
            return
        dist.all_reduce(self._sums, reduce_operation="SUM")  # every rank trains every batch: all call it
        kl, lm, teacher_ce = (self._sums[:3] / self._sums[3]).tolist()
        logger.log_metrics({DISTILL_KL: kl, DISTILL_LM: lm, DISTILL_TEACHER_CE: teacher_ce})
