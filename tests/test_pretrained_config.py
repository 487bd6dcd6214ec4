"""``model.pretrained`` is the source of truth for the architecture: a yaml that names only the
checkpoint builds exactly the checkpoint's model; a yaml field that contradicts it is refused, all of
them in one line; a legitimate choice (context length) wins with one warning line.

The checkpoint is real-shaped and made by transformers (random weights, save_pretrained): GQA with
6 query / 2 KV heads, head_dim 32 != d_model 96 / 6 heads, tied embeddings, rope_theta 1e5, Llama-3.1
rope scaling, rms_norm_eps 1e-6, eos 7: every field that shapes cannot reveal differs from llmhift's
defaults, so a field that fell back to its default would move the logits far past the tolerance.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

import train
from llmhift.build.config import load_config
from llmhift.build.trainer import build_model, build_trainer
from llmhift.convert.composer_to_hf import save_hf_to_composer
from tests.helpers import LLAMA3_8B_CONFIG, REPO_ROOT, config_only_model

HF_CONFIG = dict(
    vocab_size=2048, hidden_size=96, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=32,
    intermediate_size=160, tie_word_embeddings=True, rope_theta=1e5, rms_norm_eps=1e-6, max_position_embeddings=512,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64},
    bos_token_id=1, eos_token_id=7, pad_token_id=7,
)  # fmt: skip
# What llmhift must resolve from that config.json, with no field in the yaml.
RESOLVED = dict(vocab_size=2048, d_model=96, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=32, intermediate_size=160,
                tie_word_embeddings=True, rope_theta=1e5, rms_norm_eps=1e-6, max_seq_len=512,
                rope_scaling=HF_CONFIG["rope_scaling"])  # fmt: skip


@pytest.fixture(scope="module")
def source(demo_root, tmp_path_factory):
    """(the HF model, its folder, the demo data folder, a yaml whose model section is name + pretrained)."""
    import transformers

    tmp = tmp_path_factory.mktemp("pretrained_config")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG)).eval()
    hf.save_pretrained(tmp / "hf")
    recipe = yaml.safe_load((REPO_ROOT / "yamls/demo/pretrain.yaml").read_text())
    recipe["model"] = {"name": "llama", "pretrained": str(tmp / "hf")}
    (tmp / "short.yaml").write_text(yaml.safe_dump(recipe))
    return hf, tmp / "hf", demo_root, tmp / "short.yaml"


def run_args(data, save_folder, *extra) -> list[str]:
    return [f"variables.data_root={data}", f"save_folder={save_folder}", "progress_bar=false", "log_to_console=false",
            "max_duration=1ba", "eval_interval=1ba", "eval_subset_num_batches=2", "device_eval_batch_size=4", *extra]


def test_a_yaml_naming_only_the_checkpoint_computes_what_transformers_computes(source, tmp_path):
    hf, _, data, short = source
    config = load_config(short, run_args(data, tmp_path / "ckpt"))
    trainer = build_trainer(config)
    model = trainer.state.model.eval()
    assert {k: getattr(model.config, k) for k in RESOLVED} == RESOLVED
    saved = yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())["model"]
    assert {k: saved[k] for k in RESOLVED} == RESOLVED  # the run's config.yaml records what was built

    loader = trainer.state.evaluators[0].dataloader.dataloader
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for i, batch in zip(range(2), loader):  # the two batches eval_subset_num_batches evaluates
            ids = batch["input_ids"]  # (B, T)
            theirs = hf(ids).logits  # (B, T, V)
            ours = model(batch)
            assert (ours - theirs).abs().max().item() < 1e-5, i
            loss_sum += F.cross_entropy(theirs[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            tokens += ids[:, 1:].numel()
    trainer.eval()
    ours_ce = float(trainer.state.eval_metric_values["LanguageCrossEntropy"])
    assert abs(ours_ce - loss_sum / tokens) < 1e-5, (ours_ce, loss_sum / tokens)


def test_a_composer_checkpoint_supplies_its_stored_config(source, tmp_path):
    hf, folder, data, short = source
    converted = save_hf_to_composer(folder, tmp_path / "model.pt")  # carries the model config it was made from
    model = build_model(load_config(short, run_args(data, tmp_path / "ckpt", f"model.pretrained={converted}"))).eval()
    assert {k: getattr(model.config, k) for k in RESOLVED} == RESOLVED
    ids = torch.randint(2048, (2, 48))
    with torch.no_grad():
        assert (model({"input_ids": ids}) - hf(ids).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("name, contradictions", [
    ("llama", {"d_model": 128, "n_kv_heads": 6, "rope_theta": 10000.0}),
    ("hf_causal_lm", {"hidden_size": 128, "num_key_value_heads": 6, "rope_theta": 10000.0}),
])  # fmt: skip
def test_contradicting_fields_are_refused_all_in_one_line(name, contradictions, source, tmp_path):
    _, _, data, short = source
    overrides = [f"model.name={name}", *(f"model.{k}={v}" for k, v in contradictions.items())]
    result = subprocess.run([sys.executable, "train.py", str(short), *run_args(data, tmp_path / "ckpt"), *overrides],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: model: 3 field(s) contradict "), result.stderr
    for key, value in contradictions.items():
        assert f"{key}={value!r}" in result.stderr, key
    assert not (tmp_path / "ckpt").exists()  # refused before anything was written


@pytest.mark.parametrize("name, key", [("llama", "max_seq_len"), ("hf_causal_lm", "max_position_embeddings")])
def test_a_longer_or_shorter_context_is_a_choice_that_warns_once_and_runs(name, key, source, tmp_path, capsys):
    _, folder, data, short = source
    args = [str(short), *run_args(data, tmp_path / "ckpt", f"model.name={name}", f"model.{key}=128")]
    assert train.main(args) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: model.")]
    assert warnings == [f"warning: model.{key}: 128 overrides 512 of {folder / 'config.json'}"]


def test_dry_run_prints_the_resolved_architecture_and_where_each_field_came_from(source, tmp_path, capsys):
    _, folder, data, short = source
    assert train.main([str(short), "--dry-run", *run_args(data, tmp_path / "ckpt", "model.max_seq_len=128")]) == 0
    out = capsys.readouterr().out
    assert f"architecture: {folder / 'config.json'}\n" in out
    for line in ("  n_kv_heads: 2\n", "  head_dim: 32\n", "  rope_theta: 100000.0\n", "  rms_norm_eps: 1e-06\n",
                 "  tie_word_embeddings: True\n", "  max_seq_len: 128  (yaml, not the checkpoint's 512)\n",
                 "  attn_impl: 'sdpa'  (default)\n"):  # fmt: skip
        assert line in out, line

    assert train.main([str(short), "--dry-run", *run_args(data, tmp_path / "ckpt", "model.name=hf_causal_lm")]) == 0
    out = capsys.readouterr().out
    assert "  num_key_value_heads: 2\n" in out and "  head_dim: 32\n" in out and "model: hf_causal_lm llama" in out

    missing = tmp_path / "elsewhere"  # a dry run away from the cluster
    assert train.main([str(short), "--dry-run", *run_args(data, tmp_path / "ckpt", f"model.pretrained={missing}")]) == 0
    out = capsys.readouterr().out
    assert f"note: model.pretrained: {missing} does not exist here, so the model's architecture and size are " \
           "unknown" in out and "parameters" not in out


def test_gqa_pruning_yaml_takes_its_source_shape_from_the_config(tmp_path, capsys):
    source = f"variables.source_model={config_only_model(tmp_path, LLAMA3_8B_CONFIG)}"
    assert train.main(["yamls/pruning/llama3_8b_gqa_example.yaml", "--dry-run", source]) == 0
    pruning = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("pruning: "))
    assert "(8.03B) -> target" in pruning and "(1.83B)" in pruning and "heads 16 (kv 4)" in pruning, pruning
