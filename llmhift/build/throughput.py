"""Training cost planning for ``train.py --dry-run``: FLOPs per token and, for a named GPU, the
expected tokens/s and wall time at an assumed MFU, so a run's cost is visible before it is launched.

The count is the usual matmul one: forward 2 FLOPs per weight element a token passes through, plus
attention's two sequence-length products (scores and the weighted sum); backward costs twice the
forward. Elementwise work (norms, activations, softmax) is left out, as MFU conventions do.
"""

from __future__ import annotations

from dataclasses import dataclass

from composer.core import Time, TimeUnit

from llmhift.build.config import TrainConfig
from llmhift.build.memory import ModelShape

# Dense bf16 peak FLOP/s per GPU, without sparsity.
# H100 SXM5: 989.4 TFLOP/s (NVIDIA H100 Tensor Core GPU datasheet, "BF16 Tensor Core" 1,979 with sparsity / 2).
# A100 SXM4 80 GB: 312 TFLOP/s (NVIDIA A100 Tensor Core GPU datasheet, "BF16 Tensor Core").
PEAK_BF16_FLOPS = {"h100": 989.4e12, "h200": 989.4e12, "a100": 312e12}  # dense bf16, SXM cards
# The assumed model FLOPs utilisation: the PyTorch FSDP Llama-2-70B write-up reports 45.5% on A100s;
# 40% is a round figure a tuned FSDP run reaches on either GPU.
ASSUMED_MFU = 0.40


def matmul_params(shape: ModelShape) -> int:
    """Weight elements a token multiplies through: every block's matrices plus the output head
    (the input embedding is a lookup, not a matmul)."""
    return shape.n_layers * sum(shape.matrices().values()) + shape.d_model * shape.vocab_size


def flops_per_token(shape: ModelShape, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token at ``seq_len``, causal attention counted in full
    (the convention MFU figures use)."""
    forward = 2 * matmul_params(shape) + 2 * 2 * shape.n_layers * seq_len * shape.attn_width
    return 3 * forward


@dataclass(frozen=True)
class ThroughputPlan:
    flops_per_token: int
    gpu: str
    world_size: int
    mfu: float

    @property
    def tokens_per_second(self) -> float:
        return self.world_size * PEAK_BF16_FLOPS[self.gpu] * self.mfu / self.flops_per_token

    def hours(self, tokens: int) -> float:
        return tokens / self.tokens_per_second / 3600


def duration_tokens(config: TrainConfig, seq_len: int) -> int | None:
    """max_duration in tokens, or None when it is in epochs (the corpus size is not known here)."""
    time = Time.from_timestring(config.max_duration.replace("_", ""))
    per_unit = {TimeUnit.TOKEN: 1, TimeUnit.SAMPLE: seq_len, TimeUnit.BATCH: config.global_train_batch_size * seq_len}
    return time.value * per_unit[time.unit] if time.unit in per_unit else None


def plan_lines(shape: ModelShape, seq_len: int, gpu: str | None, world_size: int, tokens: int | None) -> list[str]:
    """The dry run's throughput lines; ``tokens`` is max_duration in tokens when it is known."""
    per_token = flops_per_token(shape, seq_len)
    lines = [f"FLOPs per token (fwd+bwd, seq {seq_len}): {per_token / 1e9:.2f} GFLOP"]
    if gpu is None:
        return lines
    plan = ThroughputPlan(per_token, gpu, world_size, ASSUMED_MFU)
    lines.append(f"expected on {world_size} x {gpu} at an assumed {ASSUMED_MFU:.0%} MFU: "
                 f"{plan.tokens_per_second:,.0f} tokens/s")
    if tokens:
        lines.append(f"max_duration ({tokens:,} tokens): {plan.hours(tokens):.2f} h wall time")
    return lines
