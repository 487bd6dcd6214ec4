"""The dry run's memory estimate against reality: the tensors of a real Composer step, the tensors
autograd really saves, and the numbers ``train.py --dry-run`` prints for the 7B yamls."""

from __future__ import annotations

import json

import pytest
import torch
from composer import Callback, Trainer
from composer.utils import reproducibility
from torch.utils.data import DataLoader, Dataset
from transformers import BloomConfig, GPT2Config, OPTConfig

import train
from llmhift.build.config import ConfigError, config_from_dict
from llmhift.build.memory import (
    ModelShape,
    activation_bytes,
    estimate_run,
    state_bytes,
)
from llmhift.build.parallel import parallelism_config
from llmhift.build.trainer import build_callbacks, build_model, build_optimizer
from tests.helpers import config_only_model

TINY = dict(name="llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96,
            max_seq_len=32)
PRUNING = dict(l0_module={"pruning_modules": ["head", "intermediate", "layer", "hidden"],
                          "target_model": {"d_model": 32, "n_heads": 2, "n_layers": 1, "intermediate_size": 48}})
BATCH, SEQ = 2, 32
# The formula counts every tensor autograd saves; what it leaves out is a handful of scalars and
# (d,)-sized mask vectors per layer, under 1% of the tiny model's activations (and far less at 7B).
ACTIVATION_TOLERANCE = 0.01


def _config(model: dict | None = None, callbacks: dict | None = None, **top):
    values = {
        "model": {**TINY, **(model or {})},
        "train_loader": {"dataset": {"local": "unused", "max_seq_len": SEQ}},
        "max_duration": "1ba",
        "global_train_batch_size": BATCH,
        "optimizer": {"name": "decoupled_adamw", "lr": 1e-3, "lag_lr": 0.1},
        "callbacks": callbacks or {},
        **top,
    }
    return config_from_dict(values)


class Tokens(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.arange(SEQ) * (i + 1) % TINY["vocab_size"]}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Accounting(Callback):
    """After each optimizer step (BATCH_END, gradients not yet zeroed): the bytes of every parameter,
    gradient and optimizer-state tensor, and HiFT's fp32 masters and parked (host) state."""

    def __init__(self, hift=None) -> None:
        self.hift, self.steps = hift, []

    def batch_end(self, state, logger) -> None:
        params = list(state.model.parameters())
        optimizer = state.optimizers[0]
        masters = self.hift._master.values() if self.hift else ()
        parked = [v for s in (self.hift._parked.values() if self.hift else ()) for v in s.values()]
        self.steps.append({
            "weights": _nbytes(params) + _nbytes(masters),
            "gradients": _nbytes(p.grad for p in params if p.grad is not None),
            "optimizer": _nbytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
            "host": _nbytes(v for v in parked if torch.is_tensor(v)),
        })


def _fit(config, batches: int):
    reproducibility.seed_all(17)
    model = build_model(config)
    callbacks = build_callbacks(config)
    hift = next((c for c in callbacks if type(c).__name__ == "HiFTCallback"), None)
    accounting = Accounting(hift)
    Trainer(model=model, optimizers=build_optimizer(config, model), callbacks=[*callbacks, accounting],
            train_dataloader=DataLoader(Tokens(), batch_size=BATCH), max_duration=f"{batches}ba",
            device="cpu", precision="fp32", progress_bar=False, log_to_console=False).fit()
    return model, hift, accounting.steps


@pytest.mark.parametrize("kind", ["plain", "pruning"])
def test_weights_gradients_optimizer_match_a_real_step(kind):
    config = _config(PRUNING if kind == "pruning" else None, {"pruning": {}} if kind == "pruning" else None)
    model, _, steps = _fit(config, batches=1)
    estimate = estimate_run(config, model, ModelShape.from_llama(model.config), world_size=1)
    assert {k: getattr(estimate, k) for k in ("weights", "gradients", "optimizer")} == {
        k: steps[0][k] for k in ("weights", "gradients", "optimizer")
    }
    if kind == "pruning":  # the L0 module's masks and lambdas are in it
        l0 = sum(p.numel() for p in model.mask_source.parameters())
        assert estimate.weights == 4 * (sum(p.numel() for p in model.model.parameters()) + l0)


@pytest.mark.parametrize("optimizer_state", ["keep", "reset"])
def test_hift_group_state_matches_a_real_cycle(optimizer_state):
    """HiFT with bf16 weights: per step, the active group's fp32 masters, gradients and optimizer
    state, and the other groups' state parked on the host (``keep``; ``reset`` parks nothing); the dry
    run reports the largest group."""
    config = _config(callbacks={"hift": {"group_element": 1, "param_dtype": "bfloat16",
                                         "optimizer_state": optimizer_state}})
    model, hift, steps = _fit(config, batches=6)  # units: embedding, block 0, block 1, norm, head; then again
    params = dict(model.named_parameters())
    cycled = {n for _, names in hift.units for n in names}
    for step, measured in enumerate(steps):
        group = {n for u in hift.groups[hift.group_at(step)] for n in hift.units[u][1]}
        n_group = sum(params[n].numel() for n in group)
        expected = state_bytes(sum(p.numel() for p in params.values()), n_group,
                               optimizer=n_group * 8 + len(group) * 4, weight=2, master_params=n_group)
        assert {k: measured[k] for k in expected} == expected, step
    others = cycled - {n for u in hift.groups[hift.group_at(5)] for n in hift.units[u][1]}
    parked = sum(params[n].numel() * 8 + 4 for n in others) if optimizer_state == "keep" else 0
    assert steps[5]["host"] == parked  # after a full cycle

    fresh = build_model(config)  # as the dry run sees it: HiFT has not frozen any unit yet
    estimate = estimate_run(config, fresh, ModelShape.from_llama(fresh.config), world_size=1)
    largest = max(steps, key=lambda s: s["gradients"])
    assert largest is steps[1]  # block 0: the blocks are this model's largest units
    assert (estimate.weights, estimate.gradients, estimate.optimizer) == (
        largest["weights"], largest["gradients"], largest["optimizer"])
    # host: every cycled parameter's state but the largest group's (moments and step counters)
    block0 = {n for u in hift.groups[1] for n in hift.units[u][1]}
    parked = sum(params[n].numel() * 8 + 4 for n in cycled - block0) if optimizer_state == "keep" else 0
    assert estimate.host == parked


def test_hift_groups_are_the_callbacks_own():
    """The groups come from HiFTCallback's INIT: always_active units join every group, frozen units
    none, and its errors are the run's."""
    block = 4 * 64 * 64 - 2 * 64 * 32 + 3 * 64 * 96 + 2 * 64  # wq, wk, wv, wo (2 kv heads), MLP, norms
    embedding = head = 256 * 64
    config = _config(callbacks={"hift": {"group_element": 2, "always_active": [0, -1], "freeze_layers": [3]}})
    model = build_model(config)
    assert sum(p.numel() for p in model.model.layers[0].parameters()) == block
    estimate = estimate_run(config, model, ModelShape.from_llama(model.config), world_size=1)
    # units: embedding, block 0, block 1, norm (frozen), head; groups [block 0, block 1] and none else
    assert estimate.gradients == 4 * (2 * block + embedding + head)
    assert estimate.host == 0  # one cycled group (the norm is frozen, else it would wait on the host)
    assert all(p.requires_grad for p in model.parameters())  # INIT ran on a copy

    clash = _config(callbacks={"hift": {"always_active": [0], "freeze_layers": [-5]}})
    with pytest.raises(ValueError, match=r"freeze_layers and always_active: both name units \[0\]"):
        estimate_run(clash, model, ModelShape.from_llama(model.config), world_size=1)


def _saved_bytes(model: torch.nn.Module, batch: dict, amp: bool = False) -> int:
    """Bytes autograd saves in one training forward and loss, each storage once (views and tensors
    saved by several ops share one), parameters left out; plus the logits, which Composer keeps
    (``state.outputs``) until backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = model(batch)
        model.loss(logits, batch)
    storages[logits.untyped_storage().data_ptr()] = logits.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("kind", ["plain", "pruning", "amp"])
def test_activations_match_saved_tensors(kind, checkpointing):
    """``amp`` runs the forward under CPU autocast (bf16), the same casts CUDA's autocast makes here."""
    model_section = {**(PRUNING if kind == "pruning" else {}), "activation_checkpointing": checkpointing}
    config = _config(model_section, {"pruning": {}} if kind == "pruning" else None,
                     precision="amp_bf16" if kind == "amp" else "fp32")
    reproducibility.seed_all(17)
    model = build_model(config).train()
    measured = _saved_bytes(model, {"input_ids": torch.randint(0, 256, (BATCH, SEQ))}, amp=kind == "amp")
    estimate = estimate_run(config, model, ModelShape.from_llama(model.config), world_size=1)
    assert estimate.activations == pytest.approx(measured, rel=ACTIVATION_TOLERANCE)


@pytest.mark.parametrize("unit", ["embedding", "block.0", "block.1", "norm", "head"])
def test_hift_activations_match_saved_tensors(unit):
    """One HiFT unit trained: nothing below it is saved, frozen blocks above it save only what their
    input's gradient needs."""
    reproducibility.seed_all(17)
    model = build_model(_config()).train()
    prefix = {"embedding": "model.tok_embeddings.", "block.0": "model.layers.0.", "block.1": "model.layers.1.",
              "norm": "model.norm.", "head": "model.lm_head."}[unit]
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefix))
    measured = _saved_bytes(model, {"input_ids": torch.randint(0, 256, (BATCH, SEQ))})
    estimate = activation_bytes(ModelShape.from_llama(model.config), BATCH, SEQ, trained_units={unit})
    assert estimate.saved == pytest.approx(measured, rel=ACTIVATION_TOLERANCE)


LLAMA2_7B = 6_738_415_616  # 32 x (4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096) + 2 x 32000 x 4096 + 4096
GiB = 2**30


def test_dry_run_prints_the_7b_pruning_estimate(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    assert 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 2 * 32000 * 4096 + 4096 == LLAMA2_7B
    source = f"variables.source_model={config_only_model(tmp_path)}"  # LLaMA-2-7B's config.json, no weights
    assert train.main(["yamls/pruning/llama2_7b_to_1.3b.yaml", "--dry-run", "--world-size", "8", source]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "memory per GPU (estimate): FSDP2 FULL_SHARD over 8 ranks, amp_bf16, decoupled_adamw, micro-batch " \
           "4 x 4096 tokens, activation checkpointing" in out

    # By hand: L0 masks head [32, 32], intermediate [32, 11008], layer [32], hidden [4096], and 2
    # lambdas per mask; 291 model tensors (9 per layer, embedding, norm, head) + 4 + 8 L0 tensors.
    l0 = 32 * 32 + 32 * 11008 + 32 + 4096 + 2 * 4
    n, tensors = LLAMA2_7B + l0, 291 + 12
    assert f"{n:,} parameters ({l0:,} of them L0 masks)" in lines["weights"]
    expected = {"weights": n * 4 / 8, "gradients": n * 4 / 8, "optimizer": (n * 8 + tensors * 4) / 8}
    # Activations (FSDP gathers bf16, blocks checkpointed), 4 x 4096 tokens per micro-batch: each
    # block's bf16 input, the embedding output before the hidden mask, the fp32 rotary tables, token
    # ids, the final norm (fp32 copy, rsqrt, normed, output), bf16 logits + fp32 log-softmax,
    # targets, and 2 fp32 values per mask entry.
    t, d = 4 * 4096, 4096
    expected["activations"] = (32 * 2 * d * t + 2 * d * t + 2 * 4096 * 128 * 4 + 8 * t
                               + (4 * d + 4 + 2 * d + 2 * d) * t + (2 + 4) * 32000 * t + 8 * t
                               + 2 * 4 * (l0 - 8))
    for key, value in expected.items():
        assert f"{value / GiB:8.2f} GiB" in lines[key], (key, lines[key])
    total = float(lines["total"].split()[1])
    assert total < 80 * 10**9 / GiB  # fits an 80 GB GPU, as the paper's 8 x A100-80GB runs did


def test_world_size_defaults_to_the_environment(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "8")
    source = f"variables.source_model={config_only_model(tmp_path)}"
    assert train.main(["yamls/pruning/llama2_7b_to_1.3b.yaml", "--dry-run", source]) == 0
    assert "FULL_SHARD over 8 ranks" in capsys.readouterr().out
    monkeypatch.delenv("WORLD_SIZE")
    assert train.main(["yamls/pruning/llama2_7b_to_1.3b.yaml", "--dry-run", "--world-size", "3"]) == 2
    assert "does not divide over 3 ranks" in capsys.readouterr().err


def test_dry_run_prints_the_7b_hift_estimate(tmp_path, capsys):
    """HiFT on one GPU, bf16 weights: the largest group is one decoder block."""
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
              "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
              "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert train.main(["yamls/hift/llama2_7b.yaml", "--dry-run", f"variables.model_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "no FSDP, 1 rank(s), amp_bf16, adamw, micro-batch 3 x 512 tokens" in out
    block = 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096  # 202,383,360
    expected = {
        "weights": LLAMA2_7B * 2 + block * 4,  # bf16 weights, the active block's fp32 master
        "gradients": block * 4,
        "optimizer": block * 8 + 9 * 4,  # 9 tensors per block
        "host": (LLAMA2_7B - block) * 8 + (291 - 9) * 4,  # every other unit's moments and steps
    }
    for key, value in expected.items():
        assert f"{value / GiB:8.2f} GiB" in lines[key], (key, lines[key])


def test_hf_shapes_of_other_families():
    """GPT-2 and OPT name their dimensions differently; a config without one is a ValueError naming it."""
    gpt2 = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256)
    assert ModelShape.from_hf(GPT2Config(**gpt2)) == ModelShape(64, 2, 4, 4, 16, 4 * 64, 256)  # n_inner None
    assert ModelShape.from_hf(GPT2Config(**gpt2, n_inner=100)).intermediate_size == 100
    opt = OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96, vocab_size=256)
    assert ModelShape.from_hf(opt) == ModelShape(64, 2, 4, 4, 16, 96, 256)
    with pytest.raises(ValueError, match=r"BloomConfig: sets none of \['intermediate_size', 'ffn_dim', 'n_inner'\]"):
        ModelShape.from_hf(BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=256))


@pytest.mark.parametrize("family", ["gpt2", "bloom"])
def test_dry_run_of_other_families(family, tmp_path, capsys):
    """A GPT-2 gets an estimate; a Bloom (no MLP width in its config) a note, not a traceback."""
    configs = {"gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256),
               "bloom": BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=256)}
    configs[family].save_pretrained(tmp_path)
    assert train.main(["yamls/hift/llama2_7b.yaml", "--dry-run", f"variables.model_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    if family == "gpt2":
        assert "memory per GPU (estimate): no FSDP, 1 rank(s)" in out
    else:
        assert "note: no memory estimate: BloomConfig: sets none of ['intermediate_size'" in out


FOUR_LAYERS = dict(n_layers=4)


def _sharded(fsdp: dict, world_size: int = 4):
    config = _config(FOUR_LAYERS, fsdp_config=fsdp, global_train_batch_size=8, device_train_microbatch_size=2)
    model = build_model(config)
    return estimate_run(config, model, ModelShape.from_llama(model.config), world_size=world_size), model


def test_fsdp2_shards_everything_whatever_the_strategy(monkeypatch):
    """FSDP2 (train.py's default) splits weights, gradients and optimizer state over the ranks under
    both strategies; SHARD_GRAD_OP (reshard_after_forward false) keeps every gathered block from
    forward to backward, FULL_SHARD two (the one computing and the one prefetched)."""
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    single, model = _sharded({}, world_size=1)  # no FSDP, one rank
    full, _ = _sharded({"sharding_strategy": "FULL_SHARD"})
    grad_op, _ = _sharded({"sharding_strategy": "SHARD_GRAD_OP"})
    unset, _ = _sharded({"reshard_after_forward": False})  # the strategy defaults to FULL_SHARD
    for estimate in (full, grad_op, unset):
        for key in ("weights", "gradients", "optimizer"):
            assert getattr(estimate, key) == -(-getattr(single, key) // 4), key
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    assert grad_op.working - full.working == 2 * block * 4  # blocks 2 and 3 also stay gathered (fp32)
    assert unset.working == grad_op.working
    assert "FSDP2 FULL_SHARD over 4 ranks" in full.heading
    assert "FSDP2 SHARD_GRAD_OP over 4 ranks" in grad_op.heading
    assert "FSDP2 FULL_SHARD (reshard_after_forward: false) over 4 ranks" in unset.heading


@pytest.mark.parametrize("strategy", ["NO_SHARD", "HYBRID_SHARD"])
def test_fsdp2_refuses_what_the_run_refuses(strategy, monkeypatch):
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    config = _config(fsdp_config={"sharding_strategy": strategy})
    with pytest.raises(ConfigError) as run:
        parallelism_config(config)
    model = build_model(config)
    with pytest.raises(ValueError) as estimate:
        estimate_run(config, model, ModelShape.from_llama(model.config), world_size=4)
    assert str(estimate.value) == str(run.value)


def test_fsdp1_strategies(monkeypatch):
    """FSDP_VERSION=1: FULL_SHARD splits all three, SHARD_GRAD_OP gradients and optimizer state,
    NO_SHARD nothing."""
    monkeypatch.setenv("FSDP_VERSION", "1")
    single, model = _sharded({}, world_size=1)
    n = sum(p.numel() for p in model.parameters())
    for strategy, split_weights, split_state in [("FULL_SHARD", True, True), ("SHARD_GRAD_OP", False, True),
                                                 ("NO_SHARD", False, False)]:
        estimate, _ = _sharded({"sharding_strategy": strategy})
        assert f"FSDP1 {strategy} over 4 ranks" in estimate.heading
        assert estimate.weights == (-(-single.weights // 4) if split_weights else single.weights), strategy
        for key in ("gradients", "optimizer"):
            assert getattr(estimate, key) == (-(-getattr(single, key) // 4) if split_state else getattr(single, key))
        if strategy == "SHARD_GRAD_OP":
            assert estimate.working == 2 * n * 4 + single.working  # gathered weights and their gradients
    with pytest.raises(ValueError, match="no memory model for 'HYBRID_SHARD' under FSDP1"):
        _sharded({"sharding_strategy": "HYBRID_SHARD"})


def test_dry_run_refuses_two_activation_checkpointings(capsys):
    argv = ["yamls/pruning/llama2_7b_to_1.3b.yaml", "--dry-run", "fsdp_config.activation_checkpointing=true"]
    assert train.main(argv) == 2
    assert "model.activation_checkpointing: both recompute every block" in capsys.readouterr().err


def test_gradients_and_activations_peak_apart_without_accumulation():
    """One micro-batch per step: backward frees activations as it fills gradients, so the peak holds the
    larger of the two (an H200 measured the 1.3B plain step at 1.01x this, bench/gpu_suite.py); with
    accumulation the earlier micro-batches' gradients wait through the next forward: both count."""
    whole, split = (_config(global_train_batch_size=4, device_train_microbatch_size=m) for m in (4, 2))
    model = build_model(whole)
    one, two = (estimate_run(c, model, ModelShape.from_llama(model.config), world_size=1) for c in (whole, split))
    assert not one.accumulating and two.accumulating
    assert one.total == one.weights + one.optimizer + max(one.activations + one.working, one.gradients)
    assert two.total == two.weights + two.optimizer + two.gradients + two.activations + two.working
    assert "larger of gradients and activations" in "\n".join(one.lines())
    assert not estimate_run(split, model, ModelShape.from_llama(model.config), world_size=2).accumulating  # 2 x 2
