"""HiFT over a ``peft`` LoRA-wrapped transformers model: the cycle visits the adapters only, one
block's adapters per step, and the frozen base weights never move."""

from __future__ import annotations

import torch
from composer import Callback, Trainer
from composer.optim import DecoupledAdamW
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from llmhift.callbacks.hift import HiFTCallback
from llmhift.models.hf_causal_lm import ComposerHFCausalLM
from tests.test_hift import Tokens

LAYERS = 3


class RecordChanges(Callback):
    """Per step: the names of the parameters whose values changed, and the parameters that held
    optimizer state once the step was taken."""

    def __init__(self) -> None:
        self.changed: list[set[str]] = []
        self.with_state: list[set[str]] = []

    def batch_start(self, state, logger) -> None:
        self.before = {n: p.detach().clone() for n, p in state.model.named_parameters()}

    def batch_end(self, state, logger) -> None:
        params = dict(state.model.named_parameters())
        self.changed.append({n for n, old in self.before.items() if not torch.equal(old, params[n])})
        names = {id(p): n for n, p in params.items()}
        self.with_state.append({names[id(p)] for p in state.optimizers[0].state})


def lora_model() -> ComposerHFCausalLM:
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16))
    # init_lora_weights=False: both factors random, so every adapter gets a gradient from the first step
    # (peft's default zero B would leave A's gradient zero until B has moved).
    adapters = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return ComposerHFCausalLM(get_peft_model(base, adapters))


def test_hift_cycles_over_lora_adapters_only():
    model = lora_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    hift, record = HiFTCallback(strategy="down2up"), RecordChanges()
    Trainer(
        model=model,
        train_dataloader=DataLoader(Tokens(), batch_size=8),
        optimizers=DecoupledAdamW(trainable, lr=1e-2, weight_decay=0.0),
        max_duration=f"{2 * LAYERS}ba",
        device="cpu",
        precision="fp32",
        callbacks=[hift, record],
        progress_bar=False,
        log_to_console=False,
    ).fit()

    assert [unit for unit, _ in hift.units] == [f"block.{i}" for i in range(LAYERS)]
    assert adapters == {n for _, names in hift.units for n in names} and all("lora_" in n for n in adapters)
    assert len(adapters) == 4 * LAYERS  # A and B of q_proj and v_proj in every block
    for step, (changed, with_state) in enumerate(zip(record.changed, record.with_state)):
        block = step % LAYERS
        expected = {n for n in adapters if f".layers.{block}." in n}
        assert changed == expected, f"step {step}: changed {sorted(changed)}"  # base weights never move
        assert with_state == expected, f"step {step}: optimizer state held for {sorted(with_state)}"
