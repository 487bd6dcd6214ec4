"""The optimizer registry (``optimizer.name``): each is built from the yaml, its bad settings are one
error line before anything is written, its state matches the memory estimate byte for byte, L0
pruning's negative rate is gradient ascent (or refused), and ``--dry-run --gpu-memory`` answers what fits."""

from __future__ import annotations

import sys

import pytest
import torch

import train
from llmhift.build.config import ConfigError, OptimizerConfig
from llmhift.build.memory import GiB, parse_memory
from llmhift.build.optimizers import OPTIMIZERS, check_optimizer, make_optimizer, optimizer_state_bytes
from llmhift.models.l0_module import HELD_LR_KEY, L0Module, pruning_param_groups
from llmhift.models.llama import ComposerLlama
from tests.helpers import config_only_model
from tests.test_bad_inputs import DEMO_YAML, assert_one_error_line, overrides

CPU = {  # every optimizer a CPU runs, with state where it has a setting for it
    "decoupled_adamw": OptimizerConfig(name="decoupled_adamw"),
    "adamw": OptimizerConfig(name="adamw"),
    "sgd": OptimizerConfig(name="sgd", momentum=0.9),
    "adagrad": OptimizerConfig(name="adagrad"),
    "adafactor": OptimizerConfig(name="adafactor"),
    "lion": OptimizerConfig(name="lion"),
}
BNB = ["adamw_8bit", "paged_adamw_8bit", "lion_8bit", "paged_lion_8bit"]
TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, max_seq_len=16)


def test_the_registry_is_every_cpu_and_bitsandbytes_name():
    assert set(OPTIMIZERS) == set(CPU) | set(BNB)


@pytest.mark.parametrize("name", sorted(CPU))
def test_state_bytes_match_the_optimizers_own_state(name):
    """Parameter-shaped moments, Adafactor's row and column statistics, scalar steps: all counted."""
    torch.manual_seed(0)
    model = ComposerLlama(TINY)
    optimizer = make_optimizer(CPU[name], model.parameters())
    batch = {"input_ids": torch.randint(64, (2, 16))}
    model.loss(model(batch), batch).backward()
    optimizer.step()
    held = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t))
    assert held == optimizer_state_bytes(CPU[name], [p.shape for p in model.parameters()]) > 0


def test_plain_sgd_keeps_no_state_and_8bit_adam_a_quarter():
    shapes = [torch.Size([4096, 4096])]
    adamw = optimizer_state_bytes(OptimizerConfig(name="adamw"), shapes)
    assert optimizer_state_bytes(OptimizerConfig(name="sgd"), shapes) == 0
    assert optimizer_state_bytes(OptimizerConfig(name="adamw_8bit"), shapes) == 2 * 4096**2 * (1 + 4 / 256) + 4
    assert optimizer_state_bytes(OptimizerConfig(name="adafactor"), shapes) == 2 * 4096 * 4 + 4 < adamw / 1000


def _ascent_matches_descent_on_the_negated_gradient(opt: OptimizerConfig) -> bool:
    """Three steps of ``opt`` at lr -1 with gradients g equal three at +1 with -g, tensor for tensor:
    what training the Lagrange multipliers at ``-lag_lr`` relies on (Sheared-LLaMA's lag_lr is 1)."""
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 5, generator=generator) for _ in range(3)]
    start = torch.randn(3, 5, generator=generator)
    results = []
    for sign in (-1, 1):
        p = torch.nn.Parameter(start.clone())
        optimizer = make_optimizer(OptimizerConfig(name=opt.name, lr=1.0, momentum=opt.momentum),
                                   [{"params": [p], "lr": -1.0 * sign}])
        for g in grads:
            p.grad = g * sign
            optimizer.step()
        results.append(p.detach())
    return torch.equal(*results)


@pytest.mark.parametrize("name", sorted(CPU))
def test_pruning_groups_ascend_at_the_negative_rate_or_are_refused(name):
    opt = CPU[name]
    if OPTIMIZERS[name].negative_lr:
        assert _ascent_matches_descent_on_the_negated_gradient(opt)
        model = ComposerLlama(TINY, mask_source=L0Module(
            ComposerLlama(TINY).config, {"d_model": 16, "n_heads": 2, "n_kv_heads": 1, "n_layers": 1,
                                         "intermediate_size": 32}, ["head", "intermediate", "layer", "hidden"]))
        optimizer = make_optimizer(opt, pruning_param_groups(model, lag_lr=1.0), pruning=True)
        assert [g.get(HELD_LR_KEY) for g in optimizer.param_groups] == [None, 1.0, -1.0]
    else:  # Adafactor: min(lr, 1/sqrt(step)) makes -lr a different step size from +lr
        assert not _ascent_matches_descent_on_the_negated_gradient(opt)
        with pytest.raises(ConfigError, match="optimizer.name: adafactor cannot train L0 pruning's Lagrange"):
            check_optimizer(opt, pruning=True)


BAD = [
    (["optimizer.name=adam"], "optimizer.name: 'adam' is not one of", "adagrad"),
    (["optimizer.name=sgd", "optimizer.momentum=1.5"], "optimizer.momentum: must be in [0, 1)", "1.5"),
    (["optimizer.name=sgd", "optimizer.nesterov=true"], "optimizer.nesterov", "positive optimizer.momentum"),
    (["optimizer.name=adamw", "optimizer.momentum=0.9"], "optimizer.momentum: adamw does not use it", "betas"),
    (["optimizer.name=sgd", "optimizer.betas=[0.9,0.99]"], "optimizer.betas: sgd does not use it", "momentum"),
    (["optimizer.name=lion", "optimizer.betas=[0.9,1.0]"], "optimizer.betas: two values in [0, 1)", "1.0"),
    (["optimizer.name=adafactor", "optimizer.eps=1e-6"], "optimizer.eps: adafactor does not use it", "drop it"),
    (["optimizer.name=adagrad", "optimizer.eps=0"], "optimizer.eps: must be positive", "got 0"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay: must be >= 0", "-0.1"),
    (["optimizer.name=lion", "optimizer.lr=0"], "optimizer.lr: lion needs a positive", "got 0"),
    (["optimizer.name=adamw_8bit"], "adamw_8bit (bitsandbytes) runs on CUDA GPUs only", "use adamw"),
    (["optimizer.name=paged_lion_8bit"], "paged_lion_8bit (bitsandbytes) runs on CUDA GPUs only", "lion"),
]


@pytest.mark.parametrize("extra, key, fix", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_optimizer_setting_is_one_line_before_anything_is_written(extra, key, fix, tmp_path, capsys):
    if "bitsandbytes" in key and torch.cuda.is_available():
        pytest.skip("the CPU refusal needs a machine without CUDA")
    assert train.main([DEMO_YAML, *overrides(tmp_path / "data", tmp_path / "ckpt", *extra)]) == 2
    assert_one_error_line(capsys.readouterr().err, key, fix)
    assert not (tmp_path / "data").exists() and not (tmp_path / "ckpt").exists()


def test_a_missing_package_names_its_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # what an environment without it imports
    assert train.main([DEMO_YAML, *overrides(tmp_path / "data", tmp_path / "ckpt", "optimizer.name=lion")]) == 2
    assert_one_error_line(capsys.readouterr().err, "lion needs the lion_pytorch package", "pip install 'llmhift[lion]'")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("name", sorted(CPU))
def test_the_yaml_section_builds_the_named_optimizer(name):
    """build_optimizer, train.py's path from the yaml: the class, the hyperparameters, pruning's groups."""
    import lion_pytorch

    from llmhift.build.config import config_from_dict
    from llmhift.build.trainer import build_model, build_optimizer

    section = {"name": name, "lr": 2e-3, "lag_lr": 0.5, **({"momentum": 0.8, "nesterov": True} if name == "sgd" else {})}
    pruning = {"pruning_modules": ["head", "layer"], "target_model": {"n_heads": 2, "n_layers": 1}}
    config = config_from_dict({"model": {"name": "llama", **TINY, "l0_module": pruning},
                               "train_loader": {"dataset": {"local": "unused", "max_seq_len": 16}},
                               "max_duration": "1ba", "global_train_batch_size": 2, "optimizer": section,
                               "callbacks": {"pruning": {}}})
    model = build_model(config)
    if not OPTIMIZERS[name].negative_lr:
        with pytest.raises(ConfigError, match=f"optimizer.name: {name} cannot train L0 pruning"):
            build_optimizer(config, model)
        return
    optimizer = build_optimizer(config, model)
    expected = {"decoupled_adamw": "DecoupledAdamW", "adamw": "AdamW", "sgd": "SGD", "adagrad": "Adagrad",
                "lion": lion_pytorch.Lion.__name__}
    assert type(optimizer).__name__ == expected[name]
    assert [g["lr"] for g in optimizer.param_groups] == [2e-3, 0.5, -0.5]
    if name == "sgd":
        assert optimizer.param_groups[0]["momentum"] == 0.8 and optimizer.param_groups[0]["nesterov"]


def test_sizes_parse_and_bad_ones_are_refused():
    assert parse_memory("24GiB") == 24 * GiB and parse_memory("80GB") == 80 * 10**9
    assert parse_memory("49140MiB") == 49140 * 2**20 and parse_memory("1.5 TiB") == int(1.5 * 2**40)
    for bad in ("24", "big", "-3GiB", "0GB", "24 parsecs", "nanGiB"):
        with pytest.raises(ConfigError, match="--gpu-memory: .* is not a memory size"):
            parse_memory(bad)


def _fits(capsys, tmp_path, *args: str) -> tuple[int, int]:
    model = f"variables.model_dir={config_only_model(tmp_path / 'llama2-7b')}"  # LLaMA-2-7B's config.json only
    assert train.main(["yamls/hift/llama2_7b.yaml", "--dry-run", model, *args]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("fits in"))
    batch = int(line.split("micro-batch ")[1].split()[0])
    return batch, int(line.split("; seq ")[1].split()[0])


def test_what_fits_is_the_largest_micro_batch_and_sequence_within_the_budget(tmp_path, capsys, monkeypatch):
    """The answer is the boundary: the estimate at the answer fits, one more does not; a smaller
    optimizer state fits more; and the printed numbers are LLaMA-2-7B's under HiFT (README's table)."""
    import llmhift.build.memory as memory

    monkeypatch.delenv("FSDP_VERSION", raising=False)
    batch, seq = _fits(capsys, tmp_path, "--gpu-memory", "24GiB")
    assert (batch, seq) == (3, 1912)
    assert _fits(capsys, tmp_path, "--gpu-memory", "24GiB", "optimizer.name=sgd",
                 "optimizer.betas=[0.9,0.95]") == (4, 2254)
    totals = {}
    real = memory.estimate_run

    def spy(config, model, shape, world_size, micro_batch=None, seq_len=None):
        estimate = real(config, model, shape, world_size, micro_batch=micro_batch, seq_len=seq_len)
        totals[(micro_batch, seq_len)] = estimate.total
        return estimate

    monkeypatch.setattr(memory, "estimate_run", spy)
    _fits(capsys, tmp_path, "--gpu-memory", "24GiB")
    assert totals[(3, None)] <= 24 * GiB < totals[(4, None)]
    assert totals[(1, 1912)] <= 24 * GiB < totals[(1, 1913)]
    # 48 GiB would hold ~7355 tokens, but LLaMA-2 has 4096 positions: the answer is what the model can run
    assert _fits(capsys, tmp_path, "--gpu-memory", "48GiB") == (14, 4096)


def test_gpu_memory_needs_the_dry_run_and_a_size(tmp_path, capsys):
    assert train.main(["yamls/hift/llama2_7b.yaml", "--gpu-memory", "24GiB"]) == 2
    assert_one_error_line(capsys.readouterr().err, "--gpu-memory: only with --dry-run")
    assert train.main(["yamls/hift/llama2_7b.yaml", "--dry-run", "--gpu-memory", "24"]) == 2
    assert_one_error_line(capsys.readouterr().err, "--gpu-memory: '24' is not a memory size", "24GiB")
