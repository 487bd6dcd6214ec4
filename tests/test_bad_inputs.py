"""Every bad input is one `error:` line (exit 2, no traceback) before anything heavy starts, and what a
crash leaves behind (a cut metrics line) or an eval that misses a domain is never read as a number."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import train
from llmhift.callbacks.hift import HiFTCallback
from llmhift.loggers import JsonlLogger
from llmhift.report import main as report_main
from llmhift.report import read_metrics_skipping
from tests.helpers import REPO_ROOT

DEMO_YAML = "yamls/demo/pretrain.yaml"
DOMAINS = ("code", "data", "docs", "reference")  # the demo corpus, in metric order


def overrides(data_root: Path, save_folder: Path, *extra: str) -> list[str]:
    return [f"variables.data_root={data_root}", f"save_folder={save_folder}", "progress_bar=false",
            "log_to_console=false", *extra]


def assert_one_error_line(err: str, *needles: str) -> None:
    err = err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """A public command in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def truncate(path: Path) -> None:
    """What a copy cut short or a full disk leaves: the first half of the file under its final name."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --- settings: refused in load_config, before the demo data is even built ---------------------------

SETTINGS = [
    (["max_duration=5"], "max_duration: '5'", "5ba"),
    (["save_interval=often"], "save_interval: 'often'", "1000ba"),
    (["eval_interval=soon"], "eval_interval: 'soon'", "1000ba"),
    (["max_duration=1000tok", "scheduler.t_warmup=10ba"], "scheduler.t_warmup: 10ba is in batches", "0.05dur"),
    (["device_eval_batch_size=0"], "device_eval_batch_size", "got 0"),
    (["optimizer.lr=-1e-3"], "optimizer.lr", "lag_lr"),
    (["model..n_layers=2"], "'model..n_layers=2'", "dotted.key=value"),
    (["max_duration=[1"], "max_duration: the value", "close its brackets"),
]


@pytest.mark.parametrize("extra, key, fix", SETTINGS, ids=[s[1].split(":")[0] for s in SETTINGS])
def test_bad_setting_is_one_line_before_anything_is_written(extra, key, fix, tmp_path, capsys):
    args = [DEMO_YAML, *overrides(tmp_path / "data", tmp_path / "ckpt", *extra)]
    assert train.main(args) == 2
    assert_one_error_line(capsys.readouterr().err, key, fix)
    assert not (tmp_path / "data").exists() and not (tmp_path / "ckpt").exists()


def test_a_warmup_in_the_runs_own_unit_or_as_a_fraction_is_accepted(tmp_path):
    from llmhift.build.config import load_config

    for warmup in ("100tok", "0.1dur"):
        config = load_config(DEMO_YAML, overrides(tmp_path, tmp_path, "max_duration=1000tok",
                                                  f"scheduler.t_warmup={warmup}"))
        assert config.scheduler.t_warmup == warmup


@pytest.mark.parametrize("text, line, fix", [("a: 1\nb:\n\tc: 2\n", "line 3", "tabs"),
                                             ("a: 1\nb: [1, 2\nc: 3\n", "line 3", "syntax")],
                         ids=["tab", "unclosed_bracket"])
def test_yaml_syntax_error_names_file_and_line(text, line, fix, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(text)
    assert train.main([str(tmp_path / "run.yaml")]) == 2
    assert_one_error_line(capsys.readouterr().err, f"{tmp_path / 'run.yaml'} {line}", fix)


# --- settings checked against the model or the data, before the model is built ---------------------

def test_hift_units_are_checked_before_the_model_is_built(demo_root, tmp_path, capsys):
    # The demo llama's units: embedding (tied head), 4 blocks, final norm.
    cases = [("callbacks.hift={freeze_layers: [9]}", "unit indices [9] are out of range for 6 units"),
             ("callbacks.hift={freeze_layers: [0, 1, 2, 3, 4, -1]}", "leave no unit to cycle over"),
             ("callbacks.hift={group_element: 7}", "group_element: 7 is larger than the 6 cycled units")]
    for extra, message in cases:
        assert train.main([DEMO_YAML, *overrides(demo_root, tmp_path / "ckpt", extra)]) == 2
        assert_one_error_line(capsys.readouterr().err, "callbacks.hift", message)
        assert not (tmp_path / "ckpt").exists()


def test_hift_plan_refuses_a_group_larger_than_the_cycled_units_and_keeps_the_rest():
    units = [(f"u{i}", [f"p{i}"]) for i in range(4)]
    assert HiFTCallback(group_element=3).plan(units)[2] == [[0, 1, 2], [3]]
    assert HiFTCallback(group_element=2, freeze_layers=[0]).plan(units)[2] == [[1, 2], [3]]
    assert HiFTCallback(group_element=3, always_active=[-1]).plan(units)[2] == [[0, 1, 2]]
    with pytest.raises(ValueError, match="group_element: 4 is larger than the 3 cycled units"):
        HiFTCallback(group_element=4, always_active=[-1]).plan(units)


def test_eta_of_the_wrong_type_names_the_key(demo_root, tmp_path, capsys):
    assert train.main([DEMO_YAML, *overrides(demo_root, tmp_path / "ckpt", "callbacks.data_loading.eta=fast")]) == 2
    assert_one_error_line(capsys.readouterr().err, "callbacks.data_loading: eta: must be a number, got str 'fast'")


def test_max_seq_len_shorter_than_the_samples_names_both(demo_root, tmp_path, capsys):
    assert train.main([DEMO_YAML, *overrides(demo_root, tmp_path / "ckpt", "model.max_seq_len=64")]) == 2
    assert_one_error_line(capsys.readouterr().err, "model.max_seq_len: 64", "(128 tokens)", "--max-seq-len 64")


def test_truncated_mds_shard_is_found_before_training(demo_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    shard = data / "mds" / "train" / "docs" / "shard.00000.mds"
    full = shard.stat().st_size
    truncate(shard)
    assert train.main([DEMO_YAML, *overrides(data, tmp_path / "ckpt")]) == 2
    assert_one_error_line(capsys.readouterr().err, "train_loader.dataset.local", str(shard),
                          f"{full // 2} bytes but index.json records {full}")
    shard.unlink()
    assert train.main([DEMO_YAML, *overrides(data, tmp_path / "ckpt")]) == 2
    assert_one_error_line(capsys.readouterr().err, f"{shard} is listed in index.json but missing")
    assert not (tmp_path / "ckpt").exists()


def test_truncated_load_path_is_refused_before_the_trainer(demo_root, tmp_path, capsys):
    checkpoint = tmp_path / "ep0-ba2-rank0.pt"
    torch.save({"state": {"model": {"w": torch.zeros(4096)}}}, checkpoint)
    truncate(checkpoint)
    for load_path, message in ((checkpoint, "does not load"),
                               (tmp_path / "nope.pt", "does not exist")):
        assert train.main([DEMO_YAML, *overrides(demo_root, tmp_path / "ckpt", f"load_path={load_path}")]) == 2
        assert_one_error_line(capsys.readouterr().err, f"load_path: {load_path}", message)
    assert not (tmp_path / "ckpt").exists()


@pytest.fixture
def truncated_bin_model(tmp_path) -> Path:
    """An HF folder whose pytorch_model.bin a copy cut short (the demo model's shape)."""
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=2048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=352, tie_word_embeddings=True, max_position_embeddings=128))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=False)
    truncate(tmp_path / "hf" / "pytorch_model.bin")
    return tmp_path / "hf"


@pytest.mark.slow
def test_truncated_pytorch_model_bin_is_one_line_for_train_and_converter(truncated_bin_model, demo_root, tmp_path,
                                                                         capsys):
    args = [DEMO_YAML, *overrides(demo_root, tmp_path / "ckpt", f"model.pretrained={truncated_bin_model}")]
    assert train.main(args) == 2
    assert_one_error_line(capsys.readouterr().err, "model.pretrained",
                          f"{truncated_bin_model / 'pytorch_model.bin'} is not a readable torch weights file")
    assert not (tmp_path / "ckpt").exists()
    result = run_cli("-m", "llmhift.convert.composer_to_hf", "save_hf_to_composer", str(truncated_bin_model),
                     str(tmp_path / "out.pt"))
    assert result.returncode == 2, result.stderr
    assert_one_error_line(result.stderr, "pytorch_model.bin is not a readable torch weights file")
    assert not (tmp_path / "out.pt").exists()


# --- the public commands in a fresh interpreter: exit 2, one line, no traceback ---------------------

@pytest.mark.slow
def test_train_cli_prints_one_line_without_traceback(demo_root, tmp_path):
    cases = [([DEMO_YAML, "max_duration=5"], "max_duration"),
             ([DEMO_YAML, *overrides(demo_root, tmp_path / "ckpt", "callbacks.hift={freeze_layers: [0, 1, 2, 3, 4, 5]}")],
              "callbacks.hift")]
    for args, needle in cases:
        result = run_cli("train.py", *args)
        assert result.returncode == 2, result.stderr[-3000:]
        assert_one_error_line(result.stderr, needle)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.slow
def test_prepare_with_an_empty_tokenizer_folder(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "raw.jsonl").write_text('{"text": "hello"}\n')
    result = run_cli("-m", "llmhift.datasets.prepare", "--tokenizer", str(tmp_path / "tokenizer"),
                     "--out", str(tmp_path / "out"), f"web={tmp_path / 'raw.jsonl'}")
    assert result.returncode == 2
    assert_one_error_line(result.stderr, f"--tokenizer {tmp_path / 'tokenizer'} holds none of", "save_pretrained")
    assert not (tmp_path / "out").exists()


# --- the report: a missing folder, a cut last line, runs with the same folder name --------------------

def test_report_on_a_missing_folder_says_so(tmp_path, capsys):
    assert report_main([str(tmp_path / "nope")]) == 2
    assert_one_error_line(capsys.readouterr().err, f"{tmp_path / 'nope'} does not exist")
    assert not (tmp_path / "nope").exists()


def log_losses(path: Path, losses: list[float]) -> None:
    logger = JsonlLogger(str(path))
    logger.init(None, None)
    for batch, loss in enumerate(losses, start=1):
        logger.log_metrics({"loss/train/total": loss}, step=batch)
    logger.close(None, None)


def test_report_skips_a_cut_last_line_and_keeps_runs_apart(tmp_path, capsys):
    team_a, team_b = tmp_path / "teamA" / "ck" / "metrics.jsonl", tmp_path / "teamB" / "ck" / "metrics.jsonl"
    log_losses(team_a, [5.0, 4.0, 3.0])
    log_losses(team_b, [6.0, 5.5])
    text = team_a.read_text()
    team_a.write_text(text[: len(text) - 9])  # a kill mid-write: the last record loses its end
    series, skipped = read_metrics_skipping(team_a)
    assert skipped == [3] and series["loss/train/total"] == {1: 5.0, 2: 4.0}

    assert report_main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert f"note: {team_a}: skipped 1 unparsable line(s) (line 3)" in captured.err
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## teamA/ck" in report and "## teamB/ck" in report  # two runs, not one
    assert "final train loss: 4.000" in report and "final train loss: 5.500" in report
    assert f"- {team_a}: skipped 1 unparsable line(s)" in report
    assert sorted(p.name for p in (tmp_path / "report").glob("*.png")) == ["teamA_ck_loss.png", "teamB_ck_loss.png"]


# --- an eval that never reaches a domain: no number for it, one warning, the weight rule ------------

@pytest.mark.slow
def test_eval_subset_hiding_domains_logs_no_loss_for_them(demo_root, tmp_path, capsys):
    # The eval set is read in order (shuffle: false), code first: one batch of 16 holds only code.
    args = [DEMO_YAML, *overrides(demo_root, tmp_path / "ckpt", "max_duration=2ba", "eval_interval=2ba",
                                  "save_interval=2ba", "eval_subset_num_batches=1")]
    with pytest.warns(UserWarning, match=r"domain\(s\) \['data', 'docs', 'reference'\] had no eval tokens"):
        assert train.main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "metrics/eval/code_LanguageCrossEntropy" in r]
    assert len(evals) == 1 and 0 < evals[0]["metrics/eval/code_LanguageCrossEntropy"] < math.log(2048) + 1
    for domain in ("data", "docs", "reference"):
        assert evals[0][f"metrics/eval/{domain}_LanguageCrossEntropy"] is None  # null, never 0.0
        assert not any(f"metrics/train/{domain}_excess_loss" in r for r in records)
    assert any("metrics/train/code_excess_loss" in r for r in records)
    # Absent domains count as at their target: they keep their weights relative to each other.
    weights = [r for r in records if "metrics/train/docs_weight" in r][-1]
    hidden = [weights[f"metrics/train/{d}_weight"] for d in ("data", "docs", "reference")]
    assert hidden[0] == pytest.approx(hidden[1]) == pytest.approx(hidden[2])
    assert math.isclose(sum(weights[f"metrics/train/{d}_weight"] for d in DOMAINS), 1.0, rel_tol=1e-9)
