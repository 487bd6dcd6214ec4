"""train.py on the demo yaml: it learns, it autoresumes, and every bad config fails early naming its key."""

import math

import pytest
import torch

import train
from llmhift.build.config import load_config
from llmhift.build.trainer import build_trainer
from llmhift.models.llama import ComposerLlama

DEMO_YAML = "yamls/demo/pretrain.yaml"
UNIFORM_LOSS = math.log(2048)  # cross-entropy of guessing uniformly over the demo vocabulary


def demo_overrides(demo_root, save_folder, *extra):
    return [f"variables.data_root={demo_root}", f"save_folder={save_folder}", "progress_bar=false",
            "log_to_console=false", *extra]


@pytest.mark.slow
def test_demo_learns_and_autoresumes(demo_root, tmp_path):
    overrides = demo_overrides(demo_root, tmp_path / "ckpt", "max_duration=60ba", "eval_interval=60ba",
                               "save_interval=60ba", "autoresume=true")
    trainer = build_trainer(load_config(DEMO_YAML, overrides))
    trainer.fit()
    values = trainer.state.eval_metric_values
    assert values["LanguageCrossEntropy"] < UNIFORM_LOSS - 1.5, values  # 7.62 -> 5.83 in 60 batches
    for domain in ("code", "docs", "reference", "data"):  # the eval set covers every domain
        assert 0 < values[f"{domain}_LanguageCrossEntropy"] < UNIFORM_LOSS, (domain, values)
    assert (tmp_path / "ckpt" / "config.yaml").is_file()

    # 2 more batches show it goes on; one eval batch, since the full eval set above costs ~10 train batches
    resumed = build_trainer(load_config(DEMO_YAML, overrides[:-4] + ["max_duration=62ba", "eval_interval=62ba",
                                                                      "save_interval=62ba", "autoresume=true",
                                                                      "eval_subset_num_batches=1"]))
    assert int(resumed.state.timestamp.batch) == 60  # continued from the checkpoint, not from scratch
    resumed.fit()
    assert int(resumed.state.timestamp.batch) == 62


def test_cli_runs_and_writes_a_convertible_checkpoint(demo_root, tmp_path, capsys):
    args = [DEMO_YAML, *demo_overrides(demo_root, tmp_path / "ckpt", "max_duration=2ba", "eval_interval=2ba",
                                       "save_interval=2ba")]
    assert train.main(args) == 0
    assert "latest-rank0.pt" in capsys.readouterr().out
    from llmhift.convert.composer_to_hf import save_composer_to_hf

    out = save_composer_to_hf(tmp_path / "ckpt" / "latest-rank0.pt", tmp_path / "hf")  # shapes from config.yaml
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("size, expected", [("1.3b", 1.35e9), ("2.7b", 2.70e9)])
def test_sheared_llama_yamls_dry_run_to_their_size(size, expected, capsys):
    assert train.main([f"yamls/pretrain/llama2_{size}.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    count = int(out.split("model: llama, ")[1].split(" parameters")[0].replace(",", ""))
    assert abs(count - expected) / expected < 0.01, count


def weights_of_another_shape(tmp_path):
    model = ComposerLlama(dict(vocab_size=2048, d_model=64, n_layers=2, n_heads=4, intermediate_size=128))
    torch.save(model.state_dict(), tmp_path / "other.pt")
    return tmp_path / "other.pt"


BAD_CONFIGS = [
    (["max_duratoin=10ba"], "max_duratoin"),
    (["train_loader.num_workres=2"], "train_loader.num_workres"),
    (["global_train_batch_size=many"], "global_train_batch_size"),
    (["train_loader.dataset.local=/nonexistent/data"], "train_loader.dataset.local"),
    (["train_loader.dataset.domains=[code,wiki]"], "wiki"),
    (["train_loader.dataset.max_seq_len=256"], "train_loader.dataset.max_seq_len"),
    (["device_train_microbatch_size=5"], "device_train_microbatch_size"),
    (["precision=amp_bf16"], "precision"),
    (["callbacks.speed_monitr={}"], "callbacks.speed_monitr"),
    (["callbacks.speed_monitor.window=3"], "callbacks.speed_monitor"),
    (["model.n_head=4"], "n_head"),
    (["model.vocab_size=100"], "model.vocab_size"),
    (["optimizer.name=adam"], "optimizer.name"),
    (["run_name=null", "autoresume=true"], "autoresume"),
    (["eval_loader.dataset.domains=[code]"], "eval_loader.dataset.domains"),
    (["model.name=mamba"], "model.name"),
    (["model.activation_checkpointing=true", "fsdp_config={activation_checkpointing: true}"],
     "fsdp_config.activation_checkpointing"),
]


@pytest.mark.parametrize("overrides, key", BAD_CONFIGS, ids=[b[1] for b in BAD_CONFIGS])
def test_bad_config_fails_early_naming_the_key(overrides, key, demo_root, tmp_path, capsys):
    assert train.main([DEMO_YAML, *demo_overrides(demo_root, tmp_path / "ckpt", *overrides)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and key in err and err.count("\n") == 0, err
    assert not (tmp_path / "ckpt").exists()  # failed before anything was written


def test_pretrained_weights_of_another_shape_are_refused(demo_root, tmp_path, capsys):
    other = weights_of_another_shape(tmp_path)
    assert train.main([DEMO_YAML, *demo_overrides(demo_root, tmp_path / "ckpt", f"model.pretrained={other}")]) == 2
    err = capsys.readouterr().err
    assert "model.pretrained" in err and "d_model=128 contradicts the weights" in err, err


def test_missing_yaml_and_malformed_override(capsys):
    assert train.main(["yamls/demo/nope.yaml"]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
    assert train.main([DEMO_YAML, "max_duration"]) == 2
    assert "dotted.key=value" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["hf_dir", "composer_pt"])
def test_pretrained_weights_load_from_hf_or_composer(source, demo_root, tmp_path):
    import transformers

    from llmhift.build.trainer import build_model
    from llmhift.convert.composer_to_hf import save_hf_to_composer
    from llmhift.models.hf_adapter import hf_to_llmhift_state_dict

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=2048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=352, tie_word_embeddings=True, max_position_embeddings=128))
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" if source == "hf_dir" else save_hf_to_composer(tmp_path / "hf", tmp_path / "model.pt")
    model = build_model(load_config(DEMO_YAML, demo_overrides(demo_root, tmp_path / "ckpt", f"model.pretrained={path}")))
    expected = hf_to_llmhift_state_dict(hf.state_dict(), tie_word_embeddings=True)
    actual = model.state_dict()
    assert sorted(actual) == sorted(expected)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


def test_dry_run_checks_settings_and_notes_what_depends_on_the_machine(demo_root, tmp_path, capsys):
    args = [DEMO_YAML, "--dry-run", *demo_overrides(demo_root, tmp_path / "ckpt")]  # the flag may come first
    assert train.main([*args, "device_train_microbatch_size=3"]) == 2
    assert "device_train_microbatch_size" in capsys.readouterr().err
    assert train.main([*args, "loggers.jsonll.path=x"]) == 2
    assert "loggers.jsonll" in capsys.readouterr().err
    assert train.main([*args, "precision=amp_bf16"]) == 0  # a GPU setting, validated on a CPU laptop
    assert "note: precision: amp_bf16 needs a GPU" in capsys.readouterr().out
    assert not (tmp_path / "ckpt").exists()
