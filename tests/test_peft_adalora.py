"""AdaLoRA in a Composer run: the rank budget shrinks on the configured cubic schedule (written out per
step), the loss carries peft's own orthogonality penalty, and a resumed run allocates as the
uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from composer import Callback, Trainer
from composer.optim import DecoupledAdamW
from torch.utils.data import DataLoader

from llmhift.callbacks.adalora import AdaLoRAAllocator
from llmhift.callbacks.hift import HiFTCallback
from llmhift.models.hf_causal_lm import ComposerHFCausalLM
from llmhift.models.peft import wrap_peft
from tests.test_hift import Tokens
from tests.test_peft import tiny_llama

# 2 blocks x (q_proj, v_proj) = 4 adapted matrices: budget 4 x init_r = 16 ranks down to 4 x target_r = 4.
SECTION = {"type": "adalora", "init_r": 4, "target_r": 1, "tinit": 2, "tfinal": 2, "deltaT": 1,
           "target_modules": ["q_proj", "v_proj"]}
# Steps 0-2 (<= tinit) keep all 16; steps 3-5 follow int(12 (1 - (s - 2) / 4)^3 + 4) = 9, 5, 4; step 6
# (total_step - tfinal) fixes the final allocation, which step 7 keeps.
RANKS_PER_STEP = [16, 16, 16, 9, 5, 4, 4, 4]


class RecordRanks(Callback):
    """After each step (and the allocator): the singular values left non-zero, counted on the weights,
    and the ranks the allocator reports; at the first step, the loss against peft's own loss."""

    def __init__(self, allocator: AdaLoRAAllocator) -> None:
        self.allocator = allocator
        self.nonzero: list[int] = []
        self.reported: list[int] = []
        self.losses: list[tuple[float, float, float]] = []

    def after_loss(self, state, logger) -> None:
        if not self.losses:
            ids = state.batch["input_ids"]
            with torch.no_grad():  # peft's AdaLoRA forward adds its penalty when HF computes the loss
                own = state.model.model(input_ids=ids, labels=ids).loss
                plain = state.model.loss(state.outputs, state.batch)  # cross-entropy alone
            self.losses.append((float(state.loss), float(own), float(plain)))

    def batch_end(self, state, logger) -> None:
        self.nonzero.append(sum(int((p != 0).sum()) for n, p in state.model.named_parameters() if "lora_E" in n))
        self.reported.append(self.allocator.ranks())


def fit(steps: int, **kwargs) -> tuple[ComposerHFCausalLM, RecordRanks]:
    model = ComposerHFCausalLM(wrap_peft(tiny_llama(), SECTION, total_steps=8))
    allocator = AdaLoRAAllocator()
    record = RecordRanks(allocator)
    Trainer(model=model, train_dataloader=DataLoader(Tokens(), batch_size=8),
            optimizers=DecoupledAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2),
            max_duration=f"{steps}ba", callbacks=[allocator, record], progress_bar=False, log_to_console=False,
            **kwargs).fit()
    return model, record


@pytest.fixture(scope="module")
def uninterrupted() -> tuple[ComposerHFCausalLM, RecordRanks]:
    return fit(8)


def test_rank_budget_shrinks_on_schedule_and_the_loss_has_the_penalty(uninterrupted):
    model, record = uninterrupted
    assert record.nonzero == RANKS_PER_STEP
    assert record.reported == RANKS_PER_STEP
    kept = model.model.peft_config["default"].rank_pattern
    assert sum(sum(mask) for mask in kept.values()) == 4
    trained, own, plain = record.losses[0]
    assert trained == pytest.approx(own, rel=1e-6)
    assert trained - plain > 1e-3  # the penalty is there: the comparison above could not pass without it


def test_resumed_run_allocates_as_the_uninterrupted_one(uninterrupted, tmp_path):
    whole, _ = uninterrupted
    fit(4, save_folder=str(tmp_path), save_interval="4ba")
    resumed, record = fit(8, load_path=str(tmp_path / "latest-rank0.pt"))
    assert record.nonzero == RANKS_PER_STEP[4:]
    assert resumed.model.peft_config["default"].rank_pattern == whole.model.peft_config["default"].rank_pattern
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_life_cycle_and_refusals():
    model = ComposerHFCausalLM(wrap_peft(tiny_llama(), SECTION, total_steps=8))
    allocator = AdaLoRAAllocator()
    trainer = Trainer(model=model, train_dataloader=DataLoader(Tokens(), batch_size=8),
                      optimizers=DecoupledAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2),
                      max_duration="2ba", callbacks=[allocator], progress_bar=False, log_to_console=False)
    trainer.fit()
    trainer.fit(duration="2ba")  # FIT_START and FIT_END a second time, on the same objects
    assert int(trainer.state.timestamp.batch) == 4 and allocator.ranks() == 9  # RANKS_PER_STEP[3]
    state = allocator.state_dict()
    fresh = AdaLoRAAllocator()
    Trainer(model=ComposerHFCausalLM(wrap_peft(tiny_llama(), SECTION, total_steps=8)), callbacks=[fresh],
            max_duration="1ba", progress_bar=False, log_to_console=False)
    fresh.load_state_dict(state)
    restored = fresh.state_dict()
    assert restored["rank_pattern"] == state["rank_pattern"]
    for key in ("exp_avg_ipt", "exp_avg_unc", "ipt"):
        assert restored[key].keys() == state[key].keys()
        assert all(torch.equal(restored[key][n], state[key][n]) for n in state[key])
    trainer.close()
    trainer.close()  # closing again is harmless

    with pytest.raises(ValueError, match=r"^callbacks.hift: AdaLoRA's rank allocator .* drop callbacks.hift"):
        Trainer(model=ComposerHFCausalLM(wrap_peft(tiny_llama(), SECTION, total_steps=8)),
                callbacks=[AdaLoRAAllocator(), HiFTCallback()], max_duration="1ba")
    with pytest.raises(ValueError, match=r"^model: AdaLoRAAllocator needs a peft AdaLoRA model"):
        Trainer(model=ComposerHFCausalLM(tiny_llama()), callbacks=[AdaLoRAAllocator()], max_duration="1ba")
