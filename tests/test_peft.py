"""``model.peft`` through train.py's build path: a yaml's LoRA/IA3/AdaLoRA run, HiFT over its adapters,
and both exports (merged HF folder, adapter folder) against the trained model's full logits; the
virtual-token methods train without HiFT and refuse it; bad sections fail in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from composer import Trainer
from composer.optim import DecoupledAdamW
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llmhift.build.config import ConfigError, config_from_dict, load_config
from llmhift.build.trainer import build_trainer, check_config, check_hift, check_peft
from llmhift.callbacks.hift import HiFTCallback
from llmhift.callbacks.hift.schedule import find_units
from llmhift.convert import composer_to_hf
from llmhift.convert.composer_to_hf import save_composer_to_hf
from llmhift.models.hf_causal_lm import ComposerHFCausalLM
from llmhift.models.peft import wrap_peft
from tests.helpers import save_hf_llama
from tests.test_hift import Tokens
from tests.test_hift_peft import RecordChanges

LAYERS = 2
ADAPTERS = {  # per method: its section, and how many adapter tensors each block holds
    "lora": ({"type": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}, 4),
    "ia3": ({"type": "ia3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}, 2),
    "adalora": ({"type": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1,
                 "target_modules": ["q_proj", "v_proj"]}, 6),
}


@pytest.fixture(scope="module")
def hf_dir(demo_root, tmp_path_factory) -> Path:
    return save_hf_llama(tmp_path_factory.mktemp("peft") / "hf", demo_root / "tokenizer", hidden_size=64,
                         intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2)


def run_config(hf_dir: Path, demo_root: Path, save: Path, peft: dict, **extra) -> dict:
    return {
        "model": {"name": "hf_causal_lm", "pretrained": str(hf_dir), "peft": peft},
        "train_loader": {"name": "text", "dataset": {"local": str(demo_root / "mds"), "split": "train"}},
        "optimizer": {"name": "adamw", "lr": 1e-2},
        "scheduler": {"name": "constant_with_warmup"},
        "max_duration": "4ba", "global_train_batch_size": 2, "save_folder": str(save), "save_interval": "4ba",
        "progress_bar": False, "log_to_console": False, **extra,
    }  # fmt: skip


@pytest.mark.parametrize("kind, hift", [("lora", True), ("ia3", True), ("adalora", False)])
def test_yaml_run_exports_merged_and_adapter_folders_with_the_trained_logits(kind, hift, hf_dir, demo_root, tmp_path):
    section, per_block = ADAPTERS[kind]
    callbacks = {"hift": {"strategy": "down2up"}} if hift else {}
    trainer = build_trainer(config_from_dict(run_config(hf_dir, demo_root, tmp_path / "ck", section,
                                                        callbacks=callbacks)))
    record = RecordChanges()
    trainer.state.callbacks.append(record)
    trainer.fit()
    model = trainer.state.model.eval()
    adapters = {n for n, _ in model.named_parameters() if "lora_" in n or "ia3_" in n}
    assert len(adapters) == per_block * LAYERS
    if hift:  # one block's adapters per step, base weights never move
        units = next(c for c in trainer.state.callbacks if isinstance(c, HiFTCallback)).units
        assert [u for u, _ in units] == [f"block.{i}" for i in range(LAYERS)]
        for step, changed in enumerate(record.changed):
            assert changed == {n for n in adapters if f".layers.{step % LAYERS}." in n}, f"step {step}"
    else:
        assert set().union(*record.changed) <= adapters
    tokens = torch.randint(2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = model({"input_ids": tokens})  # (B, T, V)
        base = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        assert (trained - base(tokens).logits).abs().max() > 1e-3  # the adapters do change the model
        ckpt = tmp_path / "ck" / "latest-rank0.pt"
        merged = AutoModelForCausalLM.from_pretrained(save_composer_to_hf(ckpt, tmp_path / "merged", merge_peft=True))
        assert not any("lora_" in n or "ia3_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged.eval()(tokens).logits, trained, rtol=1e-5, atol=1e-5)
        adapter = PeftModel.from_pretrained(base, save_composer_to_hf(ckpt, tmp_path / "adapter")).eval()
        torch.testing.assert_close(adapter(tokens).logits, trained, rtol=0, atol=1e-6)
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()  # the source's tokenizer goes along


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


@pytest.mark.parametrize("section", [{"type": "prompt_tuning", "num_virtual_tokens": 4},
                                     {"type": "prefix_tuning", "num_virtual_tokens": 4},
                                     {"type": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16}])
def test_virtual_token_methods_train_their_table_only(section):
    model = ComposerHFCausalLM(wrap_peft(tiny_llama(), section))
    table = {n for n, p in model.named_parameters() if p.requires_grad}
    assert table and all(".prompt_encoder." in n for n in table)
    record = RecordChanges()
    Trainer(model=model, train_dataloader=DataLoader(Tokens(), batch_size=8),
            optimizers=DecoupledAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2),
            max_duration="2ba", callbacks=[record], progress_bar=False, log_to_console=False).fit()
    assert record.changed[0] and all(changed <= table for changed in record.changed)
    with pytest.raises(ValueError, match=r"one trainable unit \('embedding'.*drop callbacks.hift") as err:
        HiFTCallback().plan(find_units(model))
    assert "\n" not in str(err.value)


def test_adapters_on_the_embedding_and_head_join_those_units():
    model = wrap_peft(tiny_llama(), {"type": "lora", "r": 2, "target_modules": ["embed_tokens", "q_proj", "lm_head"]})
    units = find_units(model)
    assert [u for u, _ in units] == ["embedding", "block.0", "block.1", "head"]
    assert all(".embed_tokens.lora_embedding_" in n for n in units[0][1]) and len(units[0][1]) == 2
    assert all(".lm_head.lora_" in n for n in units[-1][1]) and len(units[-1][1]) == 2


def test_hift_on_a_prompt_tuning_yaml_is_refused_before_loading(hf_dir, demo_root, tmp_path):
    config = config_from_dict(run_config(hf_dir, demo_root, tmp_path, {"type": "prompt_tuning", "num_virtual_tokens": 4},
                                         callbacks={"hift": {}}))
    with pytest.raises(ConfigError, match=r"^callbacks.hift: the model has one trainable unit .*drop callbacks.hift"):
        check_hift(config)


@pytest.mark.parametrize("model, peft, extra, message", [
    ("hf_causal_lm", {"type": "lorra"}, {}, "model.peft.type: 'lorra' is not one of"),
    ("hf_causal_lm", {"type": "lora", "rank": 4}, {}, "model.peft.rank: not a setting of LoraConfig"),
    ("hf_causal_lm", {"type": "lora", "quantize": "nf8"}, {}, "model.peft.quantize: 'nf8' is not one of"),
    ("hf_causal_lm", {"type": "lora", "quantize": "nf4"}, {}, "model.peft.quantize: nf4 needs a CUDA GPU"),
    ("hf_causal_lm", {"type": "adalora", "target_r": 2}, {"max_duration": "1ep"}, "model.peft.total_step: "),
    ("hf_causal_lm", {"type": "adalora"}, {"callbacks": {"hift": {}}}, "callbacks.hift: AdaLoRA's rank allocator"),
    ("llama", {"type": "lora"}, {}, "model.peft: needs model.name: hf_causal_lm"),
])  # fmt: skip
def test_bad_peft_sections_fail_in_one_line_naming_the_key(model, peft, extra, message, hf_dir, demo_root, tmp_path):
    if torch.cuda.is_available() and "CUDA" in message:
        pytest.skip("a GPU is here")
    values = run_config(hf_dir, demo_root, tmp_path, peft, **extra)
    values["model"]["name"] = model
    with pytest.raises(ConfigError) as err:
        check_peft(config_from_dict(values))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_cli_refuses_a_bad_section_and_merging_a_checkpoint_without_adapters(hf_dir, demo_root, tmp_path, capsys):
    import train

    yaml = tmp_path / "run.yaml"
    yaml.write_text(json.dumps(run_config(hf_dir, demo_root, tmp_path / "ck", {"type": "lora", "alpha": 8})))
    assert train.main([str(yaml)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.peft.alpha: not a setting of LoraConfig (lora); "
                                                   "known: ["), lines
    assert not (tmp_path / "ck").exists()
    assert train.main([str(yaml), "--dry-run"]) == 2  # the dry run checks the section as the run does
    assert capsys.readouterr().err.startswith("error: model.peft.alpha: not a setting of LoraConfig (lora)")
    plain = tmp_path / "plain.pt"
    torch.save({"state": {"model": tiny_llama().state_dict()}}, plain)
    assert composer_to_hf.main(["save_composer_to_hf", str(plain), str(tmp_path / "out"), "merge_peft=true"]) == 2
    assert capsys.readouterr().err.startswith(f"error: merge_peft=true: {plain} holds no peft adapters")
    assert not (tmp_path / "out").exists()


def test_demo_yaml_checks_and_plans_hift_over_its_adapters(hf_dir, demo_root, tmp_path):
    overrides = [f"variables.data_root={demo_root}", f"variables.pretrained={hf_dir}", f"save_folder={tmp_path}"]
    check_config(load_config("yamls/demo/lora_hift.yaml", overrides))
    # Without adapters the model has 4 units (embedding with its tied head, 2 blocks, norm); with them, 2.
    with pytest.raises(ConfigError, match=r"^callbacks.hift: group_element: 3 is larger than the 2 cycled units"):
        check_config(load_config("yamls/demo/lora_hift.yaml", [*overrides, "callbacks.hift.group_element=3"]))


@pytest.mark.parametrize("kind", ["PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"])
def test_merging_virtual_tokens_is_refused_before_the_checkpoint_is_read(kind):
    from peft import PeftType

    from llmhift.convert.peft_export import check_mergeable
    from llmhift.models.hf_adapter import ConversionError

    for stored in (kind, PeftType[kind]):  # as the checkpoint's JSON holds it, and as peft's to_dict gives it
        with pytest.raises(ConversionError, match=rf"^merge_peft=true: {kind.lower()} adds virtual tokens"):
            check_mergeable({"peft_type": stored})
    check_mergeable({"peft_type": "LORA"})
    check_mergeable({"peft_type": PeftType.IA3})
