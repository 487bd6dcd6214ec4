"""The dry run's FLOPs per token against torch's own FLOP counter on a real model, and the --gpu plan."""

import subprocess
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from llmhift.build.memory import ModelShape
from llmhift.build.throughput import ASSUMED_MFU, PEAK_BF16_FLOPS, ThroughputPlan, flops_per_token


def test_flops_per_token_matches_torch_flop_counter():
    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    seq_len, batch = 32, 2
    ids = torch.randint(0, config.vocab_size, (batch, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    expected = counter.get_total_flops() / (batch * seq_len)
    ours = flops_per_token(ModelShape.from_hf(config), seq_len)
    assert abs(ours - expected) / expected < 1e-4, (ours, expected)


def test_plan_is_peak_times_mfu_over_flops():
    plan = ThroughputPlan(flops_per_token=10**10, gpu="a100", world_size=16, mfu=ASSUMED_MFU)
    assert plan.tokens_per_second == 16 * PEAK_BF16_FLOPS["a100"] * ASSUMED_MFU / 10**10
    assert abs(plan.hours(int(plan.tokens_per_second) * 7200) - 2.0) < 1e-3


def test_dry_run_prints_flops_and_gpu_plan():
    out = subprocess.run([sys.executable, "train.py", "yamls/pretrain/llama2_1.3b.yaml", "--dry-run",
                          "--world-size", "8", "--gpu", "h100"], capture_output=True, text=True, check=True).stdout
    assert "FLOPs per token (fwd+bwd, seq 4096)" in out
    assert "expected on 8 x h100 at an assumed 40% MFU" in out
    assert "max_duration (50,331,648,000 tokens)" in out
