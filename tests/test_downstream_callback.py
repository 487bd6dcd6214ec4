"""DownstreamEvalCallback: the harness on the model in training, logged and recorded at each interval."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import train
from llmhift.build.config import load_config
from llmhift.build.trainer import build_callbacks
from llmhift.callbacks.downstream import DOWNSTREAM_KEY, RECORDS_FOLDER, SECONDS_KEY, DownstreamEvalCallback, hf_view
from llmhift.convert.composer_to_hf import save_composer_to_hf
from llmhift.downstream import RESULTS_NAME, TaskSpec, evaluate_model, read_results
from llmhift.models.l0_module import L0Module
from llmhift.models.llama import ComposerLlama, LlamaConfig
from llmhift.report import accuracy_series, order_records, read_metrics
from tests.choice_task import CHOICE_TASK, write_choice_task

YAML = "yamls/demo/pretrain.yaml"  # a llama from scratch: the callback's in-memory HF view is exercised
TOKENS_PER_BATCH = 4 * 128  # global_train_batch_size x the demo's sequence length


def overrides(demo_root, save, *extra):
    return [f"variables.data_root={demo_root}", f"save_folder={save}", "model.n_layers=2", "model.d_model=64",
            "model.n_heads=2", "model.n_kv_heads=1", "model.intermediate_size=128", "max_duration=4ba",
            "save_interval=2ba", "eval_interval=4ba", "eval_subset_num_batches=1", "global_train_batch_size=4",
            "device_train_microbatch_size=4", "progress_bar=false", "log_to_console=false", *extra]


def section(folder, **extra):
    settings = {"tasks": f"[{CHOICE_TASK}]", "interval": "2ba", "limit": 6, "batch_size": 4, "include_path": folder,
                **extra}
    return "callbacks.downstream={" + ", ".join(f"{k}: {v}" for k, v in settings.items()) + "}"


def test_logged_accuracy_equals_the_harness_on_the_checkpoint_of_that_batch(demo_root, tmp_path):
    tasks, save = write_choice_task(tmp_path / "tasks"), tmp_path / "ck"
    assert train.main([YAML, *overrides(demo_root, save, section(tasks))]) == 0
    generator = torch.random.get_rng_state()  # what training would draw next
    # The harness seeds the random generators and the model goes to eval mode and back: both are
    # restored, so the run trains exactly as one without the callback.
    assert train.main([YAML, *overrides(demo_root, tmp_path / "plain")]) == 0
    assert torch.equal(generator, torch.random.get_rng_state())
    losses = [read_metrics(folder / "metrics.jsonl")["loss/train/total"] for folder in (save, tmp_path / "plain")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]

    logged = read_metrics(save / "metrics.jsonl")
    acc, acc_norm = (DOWNSTREAM_KEY.format(task=CHOICE_TASK, metric=m) for m in ("acc", "acc_norm"))
    assert sorted(logged[acc]) == sorted(logged[acc_norm]) == [2, 4]
    assert sorted(logged[SECONDS_KEY]) == [2, 4] and all(s > 0 for s in logged[SECONDS_KEY].values())
    tokenizer = AutoTokenizer.from_pretrained(demo_root / "tokenizer")
    for batch in (2, 4):
        checkpoint = save / f"ep0-ba{batch}-rank0.pt"
        hf = AutoModelForCausalLM.from_pretrained(save_composer_to_hf(checkpoint, tmp_path / f"hf{batch}")).eval()
        by_hand = evaluate_model(hf, tokenizer, [TaskSpec(CHOICE_TASK)], limit=6, batch_size=4,
                                 include_path=str(tasks))[CHOICE_TASK]
        assert (logged[acc][batch], logged[acc_norm][batch]) == (by_hand["acc"], by_hand["acc_norm"])
        record = read_results(save / RECORDS_FOLDER / f"ba{batch}" / RESULTS_NAME)
        assert record["model"] == str(checkpoint) and record["stage"] == "checkpoint"
        assert (record["tokens"], record["batch"]) == (batch * TOKENS_PER_BATCH, batch)
        assert record["tasks"] == {CHOICE_TASK: {**by_hand, "limit": 6}}

    # The report draws the run's accuracy against tokens from these records.
    records = order_records(read_results(p) for p in save.rglob(RESULTS_NAME))
    assert accuracy_series(records) == {save: {CHOICE_TASK: {b * TOKENS_PER_BATCH: logged[acc][b] for b in (2, 4)}}}


@pytest.mark.parametrize("tied", [True, False])
def test_the_llama_view_shares_the_weights_and_gives_the_same_logits(tied):
    torch.manual_seed(0)
    model = ComposerLlama(LlamaConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                      intermediate_size=128, max_seq_len=64, tie_word_embeddings=tied)).eval()
    hf = hf_view(model)
    assert hf.model.embed_tokens.weight.data_ptr() == model.model.tok_embeddings.weight.data_ptr()  # no copy
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) is tied
    ids = torch.randint(256, (2, 16))  # (B, T)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model({"input_ids": ids}), rtol=0, atol=1e-5)


def test_a_pruning_model_is_refused_naming_post_pruning():
    config = LlamaConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, intermediate_size=128)
    l0 = L0Module.from_dict(config, {"target_model": {"n_layers": 1}, "pruning_modules": ["layer"]})
    with pytest.raises(ValueError, match="L0 masks.*prune_and_save_model"):
        hf_view(ComposerLlama(config, mask_source=l0))


def test_off_unless_named_and_given_the_yamls_tokenizer(demo_root, tmp_path):
    tasks = write_choice_task(tmp_path / "tasks")
    plain = build_callbacks(load_config(YAML, overrides(demo_root, tmp_path / "ck")))
    assert not any(isinstance(cb, DownstreamEvalCallback) for cb in plain)
    named = build_callbacks(load_config(YAML, overrides(demo_root, tmp_path / "ck", section(tasks))))
    (callback,) = [cb for cb in named if isinstance(cb, DownstreamEvalCallback)]
    assert callback.tokenizer == str(demo_root / "tokenizer") and callback.specs == [TaskSpec(CHOICE_TASK)]


BAD = {
    "interval": ({"interval": "often"}, [], "callbacks.downstream: interval: a positive time"),
    "tasks": ({"tasks": "[]"}, [], "callbacks.downstream: tasks: a non-empty list"),
    "limit": ({"limit": 0}, [], "callbacks.downstream: limit: an int >= 1, got 0"),
    "include_path": ({"include_path": "/nowhere"}, [], "include_path: /nowhere is not a folder"),
    "fsdp": ({}, ["fsdp_config={sharding_strategy: FULL_SHARD}"], "callbacks.downstream and fsdp_config: the model is"),
}


@pytest.mark.parametrize("settings, extra, message", BAD.values(), ids=BAD.keys())
def test_bad_settings_are_one_line_before_anything_is_written(settings, extra, message, demo_root, tmp_path, capsys):
    tasks = write_choice_task(tmp_path / "tasks")
    assert train.main([YAML, *overrides(demo_root, tmp_path / "ck", section(tasks, **settings), *extra)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "ck").exists()
