"""HiFTCallback in real Composer fits: which parameters change at each step, the learning rate per step,
gradient accumulation, where the optimizer state lives, and exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from composer import Callback, Trainer
from composer.optim import DecoupledAdamW, LinearScheduler
from composer.utils import dist
from torch.utils.data import DataLoader, Dataset

from llmhift.callbacks.hift import HiFTCallback
from llmhift.callbacks.hift.schedule import cycle_of, find_units, group_at, plan_groups
from llmhift.models.llama import ComposerLlama
from tests.helpers import CrashAt

# 2 blocks, untied head: units embedding, block.0, block.1, norm, head
MODEL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, max_seq_len=16)
UNITS = ["embedding", "block.0", "block.1", "norm", "head"]
LR = 1e-2


class Tokens(Dataset):
    """Sequences with a learnable pattern, every token counted (no -100), all of one length."""

    def __init__(self, n: int = 64, seq_len: int = 16) -> None:
        generator = torch.Generator().manual_seed(0)
        starts = torch.randint(0, 64, (n, 1), generator=generator)
        steps = torch.randint(1, 4, (n, 1), generator=generator)
        self.tokens = (starts + steps * torch.arange(seq_len)) % 64  # (n, T)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i]}


class RecordSteps(Callback):
    """Per step: the units whose parameters changed, the learning rate the optimizer used, the loss."""

    def __init__(self, hift: HiFTCallback) -> None:
        self.hift = hift
        self.changed: list[list[str]] = []
        self.lrs: list[float] = []
        self.losses: dict[int, float] = {}

    def fit_start(self, state, logger) -> None:
        state.optimizers[0].register_step_pre_hook(lambda opt, args, kwargs: self.lrs.append(opt.param_groups[0]["lr"]))

    def batch_start(self, state, logger) -> None:
        self.before = {n: p.detach().clone() for n, p in state.model.named_parameters()}

    def batch_end(self, state, logger) -> None:
        params = dict(state.model.named_parameters())
        moved = {n for n, before in self.before.items() if not torch.equal(before, params[n])}
        self.changed.append([unit for unit, names in self.hift.units if moved & set(names)])
        # every parameter of a changed unit changed: a unit moves as a whole
        assert moved == {n for unit, names in self.hift.units if unit in self.changed[-1] for n in names}
        self.losses[int(state.timestamp.batch)] = float(state.loss)



def adamw(params):
    return DecoupledAdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.0)


def make_trainer(hift, callbacks=(), max_duration="10ba", microbatch=8, save_folder=None, autoresume=False,
                 optimizer=adamw):
    torch.manual_seed(0)
    model = ComposerLlama(MODEL)
    dataset = Tokens()
    loader = DataLoader(dataset, batch_size=8, sampler=dist.get_sampler(dataset, shuffle=True, seed=3))
    return Trainer(
        model=model,
        train_dataloader=loader,
        optimizers=optimizer(model.parameters()),
        schedulers=LinearScheduler(alpha_i=1.0, alpha_f=0.0, t_max="1dur"),
        max_duration=max_duration,
        device_train_microbatch_size=microbatch,
        device="cpu",
        precision="fp32",
        seed=17,
        callbacks=[hift, *callbacks],
        run_name="hift-test",
        save_folder=None if save_folder is None else str(save_folder),
        save_interval="2ba",
        autoresume=autoresume,
        progress_bar=False,
        log_to_console=False,
    )


def run(hift, **kwargs) -> RecordSteps:
    record = RecordSteps(hift)
    make_trainer(hift, [record], **kwargs).fit()
    return record


# One expected entry per step; C = 5 groups, 10 batches, so two cycles. The linear schedule decays
# from LR to 0 over max_duration (10 batches): cycle 0 uses its value at batch 0, cycle 1 at batch 5.
SCHEDULE_CASES = {
    "down2up": [["embedding"], ["block.0"], ["block.1"], ["norm"], ["head"]] * 2,
    "up2down": [["head"], ["norm"], ["block.1"], ["block.0"], ["embedding"]] * 2,
}
EXPECTED_LR = [LR] * 5 + [LR * 0.5] * 5


@pytest.mark.parametrize("strategy", ["down2up", "up2down"])
def test_each_step_changes_exactly_the_active_unit_at_the_cycle_rate(strategy):
    record = run(HiFTCallback(strategy=strategy))
    assert [u for u, _ in record.hift.units] == UNITS
    assert record.changed == SCHEDULE_CASES[strategy]
    assert record.lrs == pytest.approx(EXPECTED_LR, rel=1e-12)


def test_random_strategy_is_a_new_seeded_permutation_per_cycle():
    record = run(HiFTCallback(strategy="random", seed=5))
    cycles = [record.changed[0:5], record.changed[5:10]]
    for cycle in cycles:
        assert sorted(u for [u] in cycle) == sorted(UNITS)  # each unit exactly once per cycle
    assert cycles[0] != cycles[1]  # reshuffled, not shuffled once
    # the documented rule: cycle c visits the groups in torch.randperm(C) seeded with seed + c
    expected = [[UNITS[g] for g in torch.randperm(5, generator=torch.Generator().manual_seed(5 + c))] for c in (0, 1)]
    assert [[u for [u] in cycle] for cycle in cycles] == expected
    again = run(HiFTCallback(strategy="random", seed=5))
    assert again.changed == record.changed


def test_groups_always_active_and_frozen_units():
    # units 0..4; freeze block.0 (1), keep the head (-1) always: cycle over [embedding, block.1], [norm]
    record = run(HiFTCallback(group_element=2, freeze_layers=[1], always_active=[-1]), max_duration="4ba")
    assert record.changed == [["embedding", "block.1", "head"], ["norm", "head"]] * 2
    # C = 2 groups over 4 batches: the rate of batch 0, then of batch 2 (linear to 0 at batch 4)
    assert record.lrs == pytest.approx([LR, LR, LR * 0.5, LR * 0.5], rel=1e-12)


def test_the_schedule_is_pure_functions_of_units_and_settings():
    """The plan and the group at each step, as the runs above follow them, with no model or Trainer."""
    units = [(u, [f"{u}.weight"]) for u in UNITS]
    plan = plan_groups(units, group_element=2, freeze_layers=[1], always_active=[-1])
    assert plan == ([1], [4], [[0, 2], [3]])  # frozen, always active, groups
    assert [plan.trained_with(g) for g in (0, 1)] == [[0, 2, 4], [3, 4]]
    assert [cycle_of(step, 3) for step in range(7)] == [0, 0, 0, 1, 1, 1, 2]
    assert [group_at(step, 3, "down2up", seed=0) for step in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert [group_at(step, 3, "up2down", seed=0) for step in range(7)] == [2, 1, 0, 2, 1, 0, 2]
    assert [group_at(step, 3, "random", seed=5) for step in range(6)] == [2, 1, 0, 2, 0, 1]  # randperm(3), seed 5 + c


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="strategy"):
        HiFTCallback(strategy="sideways")
    with pytest.raises(ValueError, match="optimizer_state"):
        HiFTCallback(optimizer_state="drop")
    with pytest.raises(ValueError, match="freeze_layers"):
        make_trainer(HiFTCallback(freeze_layers=[7]))
    with pytest.raises(ValueError, match="freeze_layers and always_active"):
        make_trainer(HiFTCallback(freeze_layers=[0], always_active=[0]))


class RecordGrads(Callback):
    """The accumulated gradient of every parameter right before each optimizer step (None: no grad)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor | None]] = []

    def after_train_batch(self, state, logger) -> None:
        self.grads.append({n: None if p.grad is None else p.grad.clone() for n, p in state.model.named_parameters()})


def sgd(params):
    # Adam's first steps are ~lr * sign(g): float rounding of near-zero gradients would flip them and
    # hide what is tested here; plain SGD keeps the update proportional to the accumulated gradient.
    return torch.optim.SGD(params, lr=0.5)


def test_gradient_accumulation_equals_the_whole_batch():
    whole, split = RecordGrads(), RecordGrads()
    a = make_trainer(HiFTCallback(group_element=2), [whole], max_duration="6ba", microbatch=8, optimizer=sgd)
    b = make_trainer(HiFTCallback(group_element=2), [split], max_duration="6ba", microbatch=4, optimizer=sgd)
    a.fit()
    b.fit()
    hift = a.state.callbacks[0]
    for step, (ga, gb) in enumerate(zip(whole.grads, split.grads)):
        active = {n for u in hift.groups[hift.group_at(step)] for n in hift.units[u][1]}
        assert {n for n, g in ga.items() if g is not None} == active  # the same group for both micro-batches
        assert {n for n, g in gb.items() if g is not None} == active
        for name in active:
            torch.testing.assert_close(gb[name], ga[name], rtol=1e-5, atol=1e-8, msg=f"step {step} {name}")
    pa, pb = dict(a.state.model.named_parameters()), dict(b.state.model.named_parameters())
    for name in pa:
        torch.testing.assert_close(pb[name], pa[name], rtol=0, atol=1e-6, msg=name)


class CheckStatePlacement(Callback):
    """After every switch: the optimizer holds state for the active group only, the rest is parked in
    the callback, and a group's parked tensors are the very ones the optimizer gets back."""

    def __init__(self, hift: HiFTCallback) -> None:
        self.hift = hift
        self.seen: dict[str, int] = {}  # parameter name -> id of its exp_avg tensor

    def before_train_batch(self, state, logger) -> None:  # after HiFT's BATCH_START switch
        optimizer = state.optimizers[0]
        names = {p: n for n, p in state.model.named_parameters()}
        active = {names[p] for p in optimizer.state}
        group = self.hift.groups[self.hift.group_at(int(state.timestamp.batch))]
        expected = {n for u in group for n in self.hift.units[u][1]}
        assert active <= expected  # a group that never ran yet has no state
        assert active.isdisjoint(self.hift._parked)
        for name, parked in self.hift._parked.items():
            assert id(parked["exp_avg"]) == self.seen[name]  # moved, not copied
        for p, s in optimizer.state.items():
            if names[p] in self.seen:
                assert id(s["exp_avg"]) == self.seen[names[p]]  # the parked tensor came back
            # back beside its own parameter: its device (a GPU run's GPU, not the host it was parked on), its shape
            assert s["exp_avg"].device == p.device and s["exp_avg"].shape == p.shape

    def batch_end(self, state, logger) -> None:
        names = {p: n for n, p in state.model.named_parameters()}
        for p, s in state.optimizers[0].state.items():
            self.seen.setdefault(names[p], id(s["exp_avg"]))
        if self.hift.optimizer_state == "keep":
            assert len(state.optimizers[0].state) + len(self.hift._parked) == len(self.seen)
        else:
            assert not self.hift._parked


@pytest.mark.parametrize("mode", ["keep", "reset"])
def test_optimizer_state_of_inactive_groups_is_parked(mode):
    hift = HiFTCallback(group_element=2, optimizer_state=mode)
    check = CheckStatePlacement(hift)
    trainer = make_trainer(hift, [check], max_duration="7ba")
    trainer.fit()
    n_params = len(list(trainer.state.model.parameters()))
    assert len(check.seen) == n_params if mode == "keep" else len(check.seen) >= n_params
    # the last step (6) trained group 0 (embedding, block.0): only its state remains in the optimizer
    held = {n for n, p in trainer.state.model.named_parameters() if p in trainer.state.optimizers[0].state}
    assert held == set(hift.units[0][1]) | set(hift.units[1][1])


@pytest.mark.slow
def test_resume_mid_cycle_equals_the_uninterrupted_run(tmp_path):
    full_hift = HiFTCallback(group_element=2, strategy="random", seed=3)
    full = RecordSteps(full_hift)
    full_trainer = make_trainer(full_hift, [full], max_duration="8ba", save_folder=tmp_path / "full")
    full_trainer.fit()

    with pytest.raises(KeyboardInterrupt):
        make_trainer(HiFTCallback(group_element=2, strategy="random", seed=3), [CrashAt(5)], max_duration="8ba",
                     save_folder=tmp_path / "crashed", autoresume=True).fit()
    hift = HiFTCallback(group_element=2, strategy="random", seed=3)
    resumed = RecordSteps(hift)
    trainer = make_trainer(hift, [resumed], max_duration="8ba", save_folder=tmp_path / "crashed", autoresume=True)
    assert int(trainer.state.timestamp.batch) == 4  # C = 3: batch 4 is the middle of cycle 1
    trainer.fit()
    assert resumed.losses == {b: full.losses[b] for b in range(5, 9)}
    assert resumed.changed == full.changed[4:]
    final = dict(full_trainer.state.model.named_parameters())
    for name, p in trainer.state.model.named_parameters():
        assert torch.equal(p, final[name]), name
    # optimizer state, active and parked, keyed by parameter name
    assert set(hift._parked) == set(full_hift._parked)
    for name in hift._parked:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(hift._parked[name][key], full_hift._parked[name][key]), (name, key)
    a = {n: trainer.state.optimizers[0].state[p] for n, p in trainer.state.model.named_parameters()
         if p in trainer.state.optimizers[0].state}
    b = {n: full_trainer.state.optimizers[0].state[p] for n, p in full_trainer.state.model.named_parameters()
         if p in full_trainer.state.optimizers[0].state}
    assert set(a) == set(b) and all(torch.equal(a[n]["exp_avg_sq"], b[n]["exp_avg_sq"]) for n in a)


def hf_configs():
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    shape = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return {
        "llama": (LlamaConfig(**shape), ["embedding", "block.0", "block.1", "norm", "head"]),
        "mistral": (MistralConfig(**shape, num_key_value_heads=2), ["embedding", "block.0", "block.1", "norm", "head"]),
        "qwen2-tied": (Qwen2Config(**shape, tie_word_embeddings=True), ["embedding", "block.0", "block.1", "norm"]),
        "gpt2": (GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4), ["embedding", "block.0", "block.1", "norm"]),
        "opt": (OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                          word_embed_proj_dim=32), ["embedding", "block.0", "block.1", "norm"]),
        "gpt-neox": (GPTNeoXConfig(**shape), ["embedding", "block.0", "block.1", "norm", "head"]),
    }


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2-tied", "gpt2", "opt", "gpt-neox"])
def test_units_are_found_structurally_in_transformers_models(arch):
    from llmhift.models.hf_causal_lm import ComposerHFCausalLM

    config, expected = hf_configs()[arch]
    model = ComposerHFCausalLM.from_config(config)
    units = find_units(model)
    assert [u for u, _ in units] == expected
    names = [n for _, members in units for n in members]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each parameter in exactly one unit
    embedding = dict(units)["embedding"]
    assert any(model.model.get_input_embeddings().weight is p for n, p in model.named_parameters() if n in embedding)
    if "head" in expected:
        assert [n for n, p in model.named_parameters() if p is model.model.get_output_embeddings().weight] == \
            [n for n in dict(units)["head"] if n.endswith("weight")]


@pytest.mark.slow
def test_bf16_weights_with_an_fp32_master_for_the_active_group_only():
    hift = HiFTCallback(group_element=2, param_dtype="bfloat16")
    trainer = make_trainer(hift, max_duration="4ba")
    trainer.fit()
    params = dict(trainer.state.model.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    active = {n for u in hift.groups[hift.group_at(3)] for n in hift.units[u][1]}
    assert set(hift._master) == active and all(m.dtype == torch.float32 for m in hift._master.values())
    for name, master in hift._master.items():
        assert torch.equal(params[name], master.to(torch.bfloat16))  # the weights are the rounded master
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in hift._master.values())  # fp32 kept
    held = {n for n, p in params.items() if p in trainer.state.optimizers[0].state}
    assert held == active and all(s["exp_avg"].dtype == torch.float32 for s in trainer.state.optimizers[0].state.values())


def test_offloaded_state_parks_on_disk_and_trains_identically(tmp_path):
    """``offload_dir``: inactive groups' Adam moments wait in files, and come back bit for bit."""
    in_memory = run(HiFTCallback(group_element=2))
    hift = HiFTCallback(group_element=2, offload_dir=str(tmp_path / "parked"))
    on_disk = run(hift)
    assert on_disk.losses == in_memory.losses and on_disk.changed == in_memory.changed
    parked = hift._parked  # after the last step (group 0 active): every other group's state is a file
    assert parked and all(isinstance(p, Path) and p.is_file() for p in parked.values())
    assert set(parked) == {n for unit, names in hift.units[2:] for n in names}
    restored = torch.load(next(iter(parked.values())), weights_only=True)
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(restored)


# --- switch_every: K optimizer steps per group (BAdam's block schedule) ------------------------------


def test_switch_every_is_a_pure_function_of_the_step():
    # C = 3 groups, K = 2: a cycle is 6 steps, each group 2 consecutive steps
    assert [cycle_of(step, 3, switch_every=2) for step in range(8)] == [0, 0, 0, 0, 0, 0, 1, 1]
    assert [group_at(step, 3, "down2up", seed=0, switch_every=2) for step in range(8)] == [0, 0, 1, 1, 2, 2, 0, 0]
    # random: cycle c's permutation (seed + c), each entry held K steps
    orders = [torch.randperm(3, generator=torch.Generator().manual_seed(5 + c)).tolist() for c in (0, 1)]
    expected = [g for order in orders for g in order for _ in range(2)]
    assert [group_at(step, 3, "random", seed=5, switch_every=2) for step in range(12)] == expected


def test_switch_every_holds_a_group_k_optimizer_steps_under_accumulation_and_the_rate_per_cycle():
    # groups [embedding, block.0], [block.1, norm], [head]; K = 2: a cycle is 6 steps, 12 steps are 2 cycles.
    # Two micro-batches per step: a switch per micro-batch would show two groups changing in one step.
    record = run(HiFTCallback(group_element=2, switch_every=2), max_duration="12ba", microbatch=4)
    groups = [["embedding", "block.0"], ["block.1", "norm"], ["head"]]
    assert record.changed == [g for g in groups for _ in range(2)] * 2
    # one rate per cycle: the linear schedule (to 0 at batch 12) at batch 0, then at batch 6
    assert record.lrs == pytest.approx([LR] * 6 + [LR * 0.5] * 6, rel=1e-12)


class RecordAdamSteps(Callback):
    """Adam's step count of the head's weight before each optimizer step in which the head trains."""

    def __init__(self, hift: HiFTCallback) -> None:
        self.hift, self.counts = hift, []

    def after_train_batch(self, state, logger) -> None:
        head = dict(state.model.named_parameters())[self.hift.units[-1][1][0]]
        if head.requires_grad:
            s = state.optimizers[0].state.get(head, {})
            self.counts.append(int(s["step"]) if "step" in s else 0)


@pytest.mark.parametrize("mode, expected", [("reset", [0, 1, 2, 0, 1, 2]), ("keep", [0, 1, 2, 3, 4, 5])])
def test_reset_with_switch_every_keeps_the_state_within_a_block_and_drops_it_at_the_switch(mode, expected):
    # BAdam: C = 2 groups ([embedding .. norm], [head]), K = 3; the head trains at steps 3-5 and 9-11
    hift = HiFTCallback(group_element=4, switch_every=3, optimizer_state=mode)
    record = RecordAdamSteps(hift)
    make_trainer(hift, [record], max_duration="12ba").fit()
    assert record.counts == expected


def test_switch_every_refusal_names_the_key():
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="^switch_every: must be a positive int"):
            HiFTCallback(switch_every=bad)
