"""Downstream evaluation: the harness' accuracy equals a hand log-likelihood choice, results round trip,
and every model the pipeline makes evaluates to the accuracy of its HF export (all offline)."""

import json
from pathlib import Path

import pytest
import torch
import transformers

from llmhift.downstream import (
    RESULTS_NAME,
    SUITES,
    TABLE_NAME,
    TaskSpec,
    evaluate_model,
    expand_tasks,
    read_results,
    write_results,
)
from llmhift.errors import ConfigError, UserError

pytest.importorskip("lm_eval")

# Questions with choices of very different lengths, so that acc_norm (log-likelihood per character)
# picks differently from acc on some of them.
QUESTIONS = [
    ("The river runs", ["north", "to the sea in spring", "dry", "under the old stone bridge"]),
    ("She opened the", ["door", "window of the tall house", "box", "letter from her brother"]),
    ("Numbers grow by", ["one", "adding the next value", "ten", "a factor of two each time"]),
    ("At night the sky", ["glows", "is full of distant stars", "falls", "turns a deep shade of blue"]),
    ("The old machine", ["hums", "stops without a warning", "rusts", "needs a careful repair"]),
    ("Bread is made from", ["flour", "water and a little salt", "rain", "grain ground into powder"]),
    ("In the morning we", ["eat", "walk to the market early", "sing", "read the printed news"]),
    ("The train arrives", ["late", "at the central station", "soon", "before the evening rain"]),
]
TEXT = "Question: {{q}}\nAnswer:"


def tiny_llama(vocab_size: int, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(config).eval()


def write_task(folder, name: str, labels: list[int]) -> None:
    """A multiple-choice task over QUESTIONS with the given gold labels: a jsonl and the yaml that
    points the harness at it (the way a user adds a local task with --include-path)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"q": q, "choices": c, "label": y} for (q, c), y in zip(QUESTIONS, labels)]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}.jsonl\n"
        f"output_type: multiple_choice\ntest_split: test\ndoc_to_text: {json.dumps(TEXT)}\n"  # JSON is YAML
        "doc_to_target: label\ndoc_to_choice: choices\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )


def hand_choices(model, tokenizer) -> tuple[list[int], list[int]]:
    """Per question, the choice of highest log-likelihood (acc) and of highest log-likelihood per
    character (acc_norm), summed token by token with plain transformers on the prompt the task yaml
    renders: ``Question: <q>\\nAnswer:`` followed by `` <choice>``."""
    picks, picks_norm = [], []
    for q, choices in QUESTIONS:
        context = f"Question: {q}\nAnswer:"
        context_ids = tokenizer.encode(context)
        scores = []
        for choice in choices:
            ids = tokenizer.encode(context + " " + choice)
            assert ids[: len(context_ids)] == context_ids  # the continuation's tokens start after the context's
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].double()  # (T, V)
            logp = torch.log_softmax(logits, dim=-1)
            scores.append(sum(logp[t - 1, ids[t]].item() for t in range(len(context_ids), len(ids))))
        picks.append(max(range(len(choices)), key=lambda i: scores[i]))
        picks_norm.append(max(range(len(choices)), key=lambda i: scores[i] / len(choices[i])))
    return picks, picks_norm


@pytest.fixture(scope="module")
def tokenizer(demo_root):
    return transformers.AutoTokenizer.from_pretrained(demo_root / "tokenizer")


def test_accuracy_equals_hand_log_likelihood_choice(tmp_path, tokenizer):
    model = tiny_llama(len(tokenizer))
    picks, picks_norm = hand_choices(model, tokenizer)
    fixed = [i % 4 for i in range(len(QUESTIONS))]
    right = sum(p == y for p, y in zip(picks, fixed))
    assert 0 < right < len(QUESTIONS), "the fixed labels must leave the random model some right, some wrong"
    assert picks != picks_norm, "length normalisation must change some choices, or acc_norm checks nothing"
    write_task(tmp_path / "tasks", "probe_fixed", fixed)
    write_task(tmp_path / "tasks", "probe_self", picks)  # gold = the hand pick: acc 1.0 iff every item agrees

    specs = expand_tasks(["probe_fixed", "probe_self"], include_path=str(tmp_path / "tasks"))
    results = evaluate_model(model, tokenizer, specs, include_path=str(tmp_path / "tasks"))

    n = len(QUESTIONS)
    assert results["probe_fixed"] == {
        "acc": right / n, "acc_norm": sum(p == y for p, y in zip(picks_norm, fixed)) / n,
        "num_fewshot": 0, "limit": None,
    }
    assert results["probe_self"]["acc"] == 1.0
    assert results["probe_self"]["acc_norm"] == sum(a == b for a, b in zip(picks_norm, picks)) / n
    assert not model.training


def test_suite_and_shots():
    assert [(s.name, s.num_fewshot) for s in SUITES["sheared_llama"]] == [
        ("arc_easy", 0), ("arc_challenge", 25), ("hellaswag", 10), ("piqa", 0), ("winogrande", 0),
        ("sciq", 0), ("logiqa", 0), ("boolq", 32), ("lambada_openai", 0), ("nq_open", 32), ("mmlu", 5),
    ]
    specs = expand_tasks(["sheared_llama", "piqa"], num_fewshot=3)
    assert specs == [TaskSpec(s.name, 3) for s in SUITES["sheared_llama"]]  # piqa once, every shot overridden
    with pytest.raises(ConfigError, match="unknown task no_such_task") as err:
        expand_tasks(["sheared_llama", "no_such_task"])
    assert "\n" not in str(err.value)


def test_missing_local_dataset_is_one_line(tmp_path, tokenizer):
    write_task(tmp_path / "tasks", "probe_gone", [0] * len(QUESTIONS))
    (tmp_path / "tasks" / "probe_gone.jsonl").unlink()
    specs = expand_tasks(["probe_gone"], include_path=str(tmp_path / "tasks"))
    with pytest.raises(UserError, match="task probe_gone: its dataset is not available") as err:
        evaluate_model(tiny_llama(len(tokenizer)), tokenizer, specs, include_path=str(tmp_path / "tasks"))
    assert "\n" not in str(err.value) and "--include-path" in str(err.value)


def test_results_round_trip_and_refusals(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    record = {"model": str(model), "stage": "source", "tokens": None, "batch": None, "harness": "lm-eval 0.4.13",
              "tasks": {"piqa": {"acc": 0.5, "acc_norm": 0.25, "num_fewshot": 0, "limit": 4},
                        "nq_open": {"acc": 0.0, "num_fewshot": 32, "limit": None}}}
    path = write_results(tmp_path / "out", record)
    assert path == tmp_path / "out" / RESULTS_NAME and read_results(path) == record
    assert "| piqa | 0 | 0.5000 | 0.2500 | 4 |" in (tmp_path / "out" / TABLE_NAME).read_text()
    write_results(tmp_path / "out", {**record, "stage": "pruned"})  # its own files: replaced
    assert read_results(path)["stage"] == "pruned"

    with pytest.raises(UserError, match="lies inside input"):
        write_results(model / "eval", record)
    assert not (model / "eval").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / RESULTS_NAME).write_text("someone else's file\n")
    with pytest.raises(UserError, match="was not written by"):
        write_results(tmp_path / "other", record)
    assert (tmp_path / "other" / RESULTS_NAME).read_text() == "someone else's file\n"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**record, "tasks": {"piqa": {"acc": "high", "num_fewshot": 0}}}))
    with pytest.raises(UserError, match=r"tasks\.piqa\.acc should be a number"):
        read_results(bad)


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_checkpoint(demo_root, tmp_path_factory):
    """latest-rank0.pt of a 2-batch train.py run on the demo yaml."""
    import train

    save_folder = tmp_path_factory.mktemp("evaluate") / "ckpt"
    assert train.main(["yamls/demo/pretrain.yaml", f"variables.data_root={demo_root}", f"save_folder={save_folder}",
                       "progress_bar=false", "log_to_console=false", "max_duration=2ba", "eval_interval=2ba",
                       "save_interval=2ba"]) == 0
    return save_folder / "latest-rank0.pt"


def test_cli_checkpoint_equals_its_hf_export(demo_checkpoint, tmp_path, capsys):
    from llmhift.convert.composer_to_hf import save_composer_to_hf
    from llmhift.evaluate import main

    write_task(tmp_path / "tasks", "probe_fixed", [i % 4 for i in range(len(QUESTIONS))])
    hf = save_composer_to_hf(demo_checkpoint, tmp_path / "hf")
    before = _snapshot(demo_checkpoint.parent)
    common = ["--tasks", "probe_fixed", "--include-path", str(tmp_path / "tasks")]
    assert main([str(demo_checkpoint), *common, "--out", str(tmp_path / "ck_eval")]) == 0
    assert main([str(hf), *common, "--limit", "8", "--out", str(tmp_path / "hf_eval")]) == 0
    ck, ref = read_results(tmp_path / "ck_eval" / RESULTS_NAME), read_results(tmp_path / "hf_eval" / RESULTS_NAME)
    assert _snapshot(demo_checkpoint.parent) == before  # the input is only read
    assert ck["stage"] == "checkpoint" and ck["batch"] == 2 and ck["tokens"] > 0
    assert ref["stage"] == "source" and ref["tokens"] is None and ref["model"] == str(hf)
    assert {k: {**v, "limit": None} for k, v in ref["tasks"].items()} == ck["tasks"]  # 8 = all documents
    # the demo model scored by hand with plain transformers on the same prompts (issue 20's reference)
    demo = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    picks, picks_norm = hand_choices(demo, transformers.AutoTokenizer.from_pretrained(hf))
    fixed, n = [i % 4 for i in range(len(QUESTIONS))], len(QUESTIONS)
    assert ck["tasks"]["probe_fixed"]["acc"] == sum(p == y for p, y in zip(picks, fixed)) / n
    assert ck["tasks"]["probe_fixed"]["acc_norm"] == sum(p == y for p, y in zip(picks_norm, fixed)) / n

    capsys.readouterr()
    bad = [
        ([str(tmp_path / "nope"), *common, "--out", str(tmp_path / "o1")], "does not exist"),
        ([str(hf), "--tasks", "no_such_task", "--out", str(tmp_path / "o2")], "unknown task no_such_task"),
        ([str(hf), *common, "--limit", "0", "--out", str(tmp_path / "o3")], "--limit 0"),
        ([str(demo_checkpoint), *common, "--out", str(demo_checkpoint.parent / "eval")], "lies inside input"),
        ([str(hf), *common, "--batch-size", "0", "--out", str(tmp_path / "o4")], "--batch-size 0"),
        ([str(hf), *common, "--tokenizer", str(tmp_path / "none"), "--out", str(tmp_path / "o5")], "is not a folder"),
    ]
    if not torch.cuda.is_available():
        bad.append(([str(hf), *common, "--device", "cuda", "--out", str(tmp_path / "o6")], "no CUDA device"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "downstream.md").write_text("a colleague's notes\n")  # not ours: refused before any evaluation
    bad.append(([str(hf), *common, "--out", str(foreign)], "downstream.md"))
    for argv, message in bad:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not Path(argv[-1]).exists() or sorted(p.name for p in Path(argv[-1]).iterdir()) == ["downstream.md"]
    assert (foreign / "downstream.md").read_text() == "a colleague's notes\n"
    assert _snapshot(demo_checkpoint.parent) == before


def test_offline_builtin_task_is_one_line(demo_checkpoint, tmp_path):
    """HF_DATASETS_OFFLINE=1 and piqa not in the datasets cache: one line naming piqa, no download."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "empty_cache")}
    proc = subprocess.run([sys.executable, "-m", "llmhift.evaluate", str(demo_checkpoint), "--tasks", "piqa",
                           "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: task piqa: its dataset is not available") and "HF_DATASETS_CACHE" in last
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_cli_pruned_equals_its_hf_export(demo_root, tmp_path):
    """A pruned-*.pt (post-pruning's output of a 2-batch demo pruning run) scores as its HF export."""
    import train
    from llmhift.convert.composer_to_hf import save_composer_to_hf
    from llmhift.convert.post_pruning import prune_and_save_model
    from llmhift.evaluate import main

    save_folder = tmp_path / "ckpt"
    assert train.main(["yamls/demo/prune.yaml", f"variables.data_root={demo_root}", f"save_folder={save_folder}",
                       "progress_bar=false", "log_to_console=false", "max_duration=2ba", "eval_interval=2ba",
                       "save_interval=2ba", "global_train_batch_size=4", "device_train_microbatch_size=4",
                       "eval_subset_num_batches=1", "model.l0_module.lagrangian_warmup_steps=1ba"]) == 0
    pruned = prune_and_save_model(save_folder / "latest-rank0.pt")
    hf = save_composer_to_hf(pruned, tmp_path / "hf")
    write_task(tmp_path / "tasks", "probe_fixed", [i % 4 for i in range(len(QUESTIONS))])
    before = _snapshot(save_folder)
    common = ["--tasks", "probe_fixed", "--include-path", str(tmp_path / "tasks")]
    assert main([str(pruned), *common, "--out", str(tmp_path / "pruned_eval")]) == 0
    assert main([str(hf), *common, "--out", str(tmp_path / "hf_eval")]) == 0
    got, ref = read_results(tmp_path / "pruned_eval" / RESULTS_NAME), read_results(tmp_path / "hf_eval" / RESULTS_NAME)
    assert got["stage"] == "pruned" and got["tokens"] is None and got["tasks"] == ref["tasks"]
    assert _snapshot(save_folder) == before
