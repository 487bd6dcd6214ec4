"""A checkpoint knows what it is, and an export keeps what its source model had.

The source is a real-shaped HF Llama saved by ``transformers`` (random weights): GQA 4 query / 2 KV
heads, head_dim 32 with d_model 64, tied embeddings, rope_theta 1e5, llama3 rope scaling, max_position_embeddings 8192,
its own bos / eos / pad ids, a generation_config.json whose EOS list holds one more id than
config.json's (as Llama-3-Instruct's does), and the demo tokenizer. train.py trains from it on the demo
data; every checkpoint it writes (file or sharded, resumed or not) carries the model config and the
source's files, and the HF export equals the source's config.json except the dtype (or, after pruning,
the pruned shape fields) and stops generating at the source's EOS.
"""

import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

import train
from llmhift.callbacks import CheckpointMetadataCallback
from llmhift.checkpoint.io import METADATA_CALLBACK, stored_metadata
from llmhift.convert.composer_to_hf import main as composer_to_hf_main
from llmhift.convert.composer_to_hf import save_composer_to_hf
from llmhift.convert.post_pruning import main as post_pruning_main
from llmhift.convert.post_pruning import prune_and_save_model
from tests.helpers import REPO_ROOT, launch_ranks, rank_logs

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024}  # fmt: skip
TARGET = {"d_model": 32, "n_heads": 2, "n_kv_heads": 1, "n_layers": 2, "intermediate_size": 88}
# config.json's names of the fields pruning changes, and the target's value of each.
PRUNED_FIELDS = {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 2,
                 "intermediate_size": 88}  # fmt: skip
BOS, PAD, CONFIG_EOS = 3, 4, 5
PROMPT = [[17, 250, 1033, 9, 77]]


def greedy(model, max_new_tokens=12, **generation):
    with torch.no_grad():
        out = model.generate(torch.tensor(PROMPT), max_new_tokens=max_new_tokens, do_sample=False, **generation)
    return out[0, len(PROMPT[0]):].tolist()


@pytest.fixture(scope="module")
def source(demo_root, tmp_path_factory):
    """(HF folder, the EOS id its generation_config adds): that id is the first token the model generates
    greedily after PROMPT, so a model that honours the source's generation_config stops right there."""
    folder = tmp_path_factory.mktemp("source") / "hf"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, rope_theta=1e5, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_scaling=LLAMA3_ROPE, bos_token_id=BOS, eos_token_id=CONFIG_EOS, pad_token_id=PAD,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    first = greedy(model, max_new_tokens=1, eos_token_id=None)[0]
    assert first not in (2, BOS, PAD, CONFIG_EOS)  # distinguishable from every other id a config could stop at
    model.generation_config = transformers.GenerationConfig(bos_token_id=BOS, eos_token_id=[CONFIG_EOS, first],
                                                            pad_token_id=PAD)
    model.save_pretrained(folder)
    for file in (demo_root / "tokenizer").iterdir():
        shutil.copy(file, folder / file.name)
    return folder, first


@pytest.fixture(scope="module")
def short_yamls(source, tmp_path_factory):
    """The demo pretrain and prune yamls with the model section a user writes for a pretrained model:
    the source folder (and the pruning target), no hand-copied architecture."""
    hf_dir, _ = source
    folder = tmp_path_factory.mktemp("yamls")
    paths = {}
    for name in ("pretrain", "prune"):
        values = yaml.safe_load((REPO_ROOT / "yamls" / "demo" / f"{name}.yaml").read_text())
        model = {"name": "llama", "pretrained": str(hf_dir)}
        if "l0_module" in values["model"]:
            model["l0_module"] = values["model"]["l0_module"]
        values["model"] = model
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(values))
    return {name: str(path) for name, path in paths.items()}


def read_json(path):
    return json.loads(path.read_text())


def run_train(yaml_file, demo_root, save_folder, *extra):
    argv = [yaml_file, f"variables.data_root={demo_root}", f"save_folder={save_folder}", "progress_bar=false",
            "log_to_console=false", "global_train_batch_size=4", "device_train_microbatch_size=4",
            "eval_subset_num_batches=1", *extra]  # fmt: skip
    assert train.main(argv) == 0


def assert_config_kept(exported, source_config, changed=None):
    """config.json equals the source's field by field, except the dtype and the ``changed`` fields."""
    for key in ("dtype", "torch_dtype"):  # transformers >= 4.56 spells it dtype
        exported.pop(key, None), source_config.pop(key, None)
    for field, value in (changed or {}).items():
        assert exported.pop(field) == value, field
        source_config.pop(field)
    assert sorted(exported) == sorted(source_config)
    for field, value in source_config.items():
        assert exported[field] == value, field


@pytest.fixture(scope="module")
def trained(short_yamls, demo_root, tmp_path_factory):
    """A 2-batch run from the source at lr 0 (its weights stay the source's, so its generations are the
    source's), then resumed for a third batch."""
    save_folder = tmp_path_factory.mktemp("trained") / "ckpt"
    common = ["optimizer.lr=0.0", "eval_interval=1ba", "save_interval=1ba", "autoresume=true", "run_name=from-hf"]
    run_train(short_yamls["pretrain"], demo_root, save_folder, *common, "max_duration=2ba")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_train(short_yamls["pretrain"], demo_root, save_folder, *common, "max_duration=3ba")
    # Composer warns "<qualname> is not in the state_dict" for a callback whose state a checkpoint lacks
    assert not [w for w in caught if METADATA_CALLBACK in str(w.message)]
    return save_folder


def test_every_checkpoint_carries_the_model_config_and_the_source(source, trained):
    hf_dir, _ = source
    first, resumed = trained / "ep0-ba2-rank0.pt", trained / "latest-rank0.pt"
    assert resumed.resolve().name == "ep0-ba3-rank0.pt"  # written by the resumed run
    checkpoint = torch.load(resumed, weights_only=False)
    assert METADATA_CALLBACK in checkpoint["state"]["callbacks"]  # where Composer keeps callback state
    for path in (first, resumed):
        meta = stored_metadata(path)
        assert meta["model_config"]["head_dim"] == 32 and meta["model_config"]["max_seq_len"] == 8192  # the source's
        assert meta["hf_config"] == read_json(hf_dir / "config.json")
        assert meta["generation_config"] == read_json(hf_dir / "generation_config.json")
        assert meta["tokenizer_files"]["tokenizer.json"] == (hf_dir / "tokenizer.json").read_bytes()
        assert "l0_module" not in meta


def test_export_keeps_the_source_config_and_stops_at_its_eos(source, trained, tmp_path):
    hf_dir, eos = source
    out = save_composer_to_hf(trained / "latest-rank0.pt", tmp_path / "hf")
    assert_config_kept(read_json(out / "config.json"), read_json(hf_dir / "config.json"))
    assert read_json(out / "generation_config.json") == read_json(hf_dir / "generation_config.json")
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    exported, original = load_file(out / "model.safetensors"), load_file(hf_dir / "model.safetensors")
    assert sorted(exported) == sorted(original) and all(torch.equal(exported[k], original[k]) for k in original)

    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert greedy(model) == [eos]  # stopped at the source's extra EOS
    assert len(greedy(model, eos_token_id=None)) == 12  # without it the model would have gone on
    assert transformers.AutoTokenizer.from_pretrained(out).vocab_size == 2048


@pytest.fixture(scope="module")
def pruned_run(short_yamls, demo_root, tmp_path_factory):
    save_folder = tmp_path_factory.mktemp("pruned") / "ckpt"
    target = ", ".join(f"{k}: {v}" for k, v in TARGET.items())
    run_train(short_yamls["prune"], demo_root, save_folder, f"model.l0_module.target_model={{{target}}}", "model.l0_module.lagrangian_warmup_steps=2ba",
              "max_duration=3ba", "eval_interval=3ba", "save_interval=3ba")  # fmt: skip
    return save_folder / "latest-rank0.pt"


def test_prune_and_export_keep_the_source_config_but_the_pruned_fields(source, pruned_run, tmp_path):
    hf_dir, _ = source
    meta = stored_metadata(pruned_run)
    assert meta["l0_module"]["target_model"] == TARGET and meta["model_config"]["d_model"] == 64
    pruned = prune_and_save_model(pruned_run)
    assert {k: stored_metadata(pruned)["model_config"][k] for k in TARGET} == TARGET
    out = save_composer_to_hf(pruned, tmp_path / "hf")
    assert_config_kept(read_json(out / "config.json"), read_json(hf_dir / "config.json"), PRUNED_FIELDS)
    assert read_json(out / "generation_config.json") == read_json(hf_dir / "generation_config.json")


def prune_cli(*args):
    return subprocess.run([sys.executable, "-m", "llmhift.convert.post_pruning", "prune_and_save_model",
                           *map(str, args)], capture_output=True, text=True, cwd=REPO_ROOT)  # fmt: skip


def test_an_overwritten_config_yaml_is_refused_naming_the_fields(pruned_run, tmp_path):
    """The issue's case: a later run into the same folder rewrote config.yaml with another target; the
    post-processing used to exit 0 with that target's shape."""
    (tmp_path / "ckpt").mkdir()
    for name in ("config.yaml", pruned_run.name):  # a copy of the run's folder: this test edits it
        shutil.copy(pruned_run.parent / name, tmp_path / "ckpt" / name)
    pruned_run = tmp_path / "ckpt" / pruned_run.name
    config_yaml = pruned_run.parent / "config.yaml"
    run = yaml.safe_load(config_yaml.read_text())
    run["model"]["l0_module"]["target_model"] = {**TARGET, "d_model": 48, "n_layers": 1}
    config_yaml.write_text(yaml.safe_dump(run))
    pruned = pruned_run.parent / f"pruned-{pruned_run.name}"
    before = pruned.read_bytes() if pruned.exists() else None

    result = prune_cli(pruned_run, "overwrite=true")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    line, = result.stderr.strip().splitlines()
    assert line.startswith("error: the config.yaml beside")
    assert "model.l0_module.target_model.d_model=48 (checkpoint: 32)" in line
    assert "model.l0_module.target_model.n_layers=1 (checkpoint: 2)" in line
    assert "move it aside" in line
    assert (pruned.read_bytes() if pruned.exists() else None) == before

    other = tmp_path / "other.yaml"  # given explicitly: refused just the same
    run["model"]["l0_module"]["target_model"] = TARGET
    run["model"]["n_layers"] = 4
    other.write_text(yaml.safe_dump(run))
    assert post_pruning_main(["prune_and_save_model", str(pruned_run), f"config={other}", "overwrite=true"]) == 2

    config_yaml.rename(config_yaml.with_name("config.yaml.stale"))  # what the error says to do
    shape = stored_metadata(prune_and_save_model(pruned_run, overwrite=True))["model_config"]
    assert {k: shape[k] for k in TARGET} == TARGET  # the trained target, not the overwritten one


def test_contradicting_config_argument_names_the_model_fields(pruned_run, tmp_path, capsys):
    run = {"model": {"name": "llama", "d_model": 96, "n_layers": 4, "head_dim": 32, "attn_impl": "eager"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    # overwrite: an earlier test's pruned-* sits beside the checkpoint, and only the config may be refused here
    assert post_pruning_main(["prune_and_save_model", str(pruned_run), f"config={tmp_path / 'run.yaml'}",
                              "overwrite=true"]) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert "model.d_model=96 (checkpoint: 64), model.n_layers=4 (checkpoint: 3)" in line
    assert "head_dim" not in line and "attn_impl" not in line  # agreeing and runtime-only fields are no contradiction


def test_export_refuses_a_config_yaml_that_contradicts_the_checkpoint(trained, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    shutil.copy(trained / "latest-rank0.pt", tmp_path / "ckpt" / "ep0-ba3-rank0.pt")
    run = yaml.safe_load((trained / "config.yaml").read_text())
    run["model"].update(d_model=96, rope_theta=10000.0)
    (tmp_path / "ckpt" / "config.yaml").write_text(yaml.safe_dump(run))
    assert composer_to_hf_main(["save_composer_to_hf", str(tmp_path / "ckpt" / "ep0-ba3-rank0.pt"),
                                str(tmp_path / "hf")]) == 2  # fmt: skip
    line, = capsys.readouterr().err.strip().splitlines()
    assert "model.d_model=96 (checkpoint: 64), model.rope_theta=10000.0 (checkpoint: 100000.0)" in line
    assert not (tmp_path / "hf").exists()


def test_callback_state_is_one_json_leaf_under_the_readers_name():
    """Composer keys callback state by __qualname__; the readers find it under METADATA_CALLBACK."""
    assert CheckpointMetadataCallback.__qualname__ == METADATA_CALLBACK
    callback = CheckpointMetadataCallback()
    callback.metadata = {"model_config": {"d_model": 8}, "tokenizer_files": {"tokenizer.model": b"\x00\xff"}}
    fresh = CheckpointMetadataCallback()
    fresh.load_state_dict(callback.state_dict())
    assert fresh.metadata == callback.metadata
    assert all(isinstance(v, str) for v in callback.state_dict().values())


@pytest.mark.slow
def test_sharded_checkpoints_carry_it_through_a_resume(source, short_yamls, demo_root, tmp_path):
    """FSDP2 on 2 CPU ranks: sharded checkpoints carry the metadata, and a resumed run loads it (a sharded
    load fails on any key the checkpoint lacks) and passes it on; the export reads the sharded folder."""
    hf_dir, eos = source
    args = [short_yamls["pretrain"], f"variables.data_root={demo_root}", f"save_folder={tmp_path / 'ckpt'}",
            "optimizer.lr=0.0", "global_train_batch_size=4",
            "device_train_microbatch_size=2", "eval_interval=1ba", "eval_subset_num_batches=1", "save_interval=1ba",
            "autoresume=true", "run_name=sharded", "progress_bar=false", "log_to_console=false",
            "fsdp_config={sharding_strategy: FULL_SHARD, state_dict_type: sharded}"]  # fmt: skip
    for duration in ("1ba", "2ba"):
        logs = tmp_path / f"logs-{duration}"
        result = launch_ranks("train.py", [*args, f"max_duration={duration}"], logs, timeout=300)
        assert result.returncode == 0, result.stdout[-4000:] + rank_logs(logs)
        assert METADATA_CALLBACK not in result.stdout + rank_logs(logs)  # no "not in the state_dict" on resume
    latest = tmp_path / "ckpt" / "latest-rank0.pt"
    assert latest.resolve().name == "ep0-ba2" and (latest / ".metadata").is_file()
    meta = stored_metadata(latest)
    assert meta["hf_config"] == read_json(hf_dir / "config.json") and meta["model_config"]["n_kv_heads"] == 2
    out = save_composer_to_hf(latest, tmp_path / "hf")
    assert_config_kept(read_json(out / "config.json"), read_json(hf_dir / "config.json"))
    assert greedy(transformers.AutoModelForCausalLM.from_pretrained(out).eval()) == [eos]
