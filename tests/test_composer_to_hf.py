"""HF <-> Composer conversion: bit-exact round trips, configs inferred offline, bad input refused cleanly."""

import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers

from llmhift.convert import composer_to_hf
from llmhift.convert.compare_logits import main as equivalence_main
from llmhift.convert.compare_logits import max_logit_difference
from llmhift.convert.composer_to_hf import load_llama_checkpoint, save_composer_to_hf, save_hf_to_composer
from llmhift.models.hf_adapter import ConversionError, llama_config_from_hf
from llmhift.models.llama import ComposerLlama
from tests.test_llama import LLAMA31_SCALING, tiny_hf_llama

# Fields of config.json a round trip must keep exactly.
CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rope_scaling",
    "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id",
)


def save_tokenizer(folder):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(97 + i): 3 + i for i in range(26)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(folder)


@pytest.fixture(params=["mha_untied", "gqa_llama31_rope", "tied"])
def hf_dir(request, tmp_path):
    overrides = {
        "mha_untied": {},
        "gqa_llama31_rope": {"num_key_value_heads": 2, "rope_theta": 500000.0, "rope_scaling": LLAMA31_SCALING},
        "tied": {"tie_word_embeddings": True},
    }[request.param]
    folder = tmp_path / f"hf-{request.param}"
    tiny_hf_llama(**overrides).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def hf_tensors(folder):
    return load_file(folder / "model.safetensors")


def test_round_trip_is_bit_exact(hf_dir, tmp_path):
    composer_pt = save_hf_to_composer(hf_dir, tmp_path / "model.pt")
    back = save_composer_to_hf(composer_pt, tmp_path / "back")

    original, returned = hf_tensors(hf_dir), hf_tensors(back)
    assert sorted(returned) == sorted(original)
    for key, tensor in original.items():
        assert returned[key].dtype == tensor.dtype, key
        assert torch.equal(returned[key], tensor), key

    source_config = json.loads((hf_dir / "config.json").read_text())
    back_config = json.loads((back / "config.json").read_text())
    for field in CONFIG_FIELDS:
        assert back_config.get(field) == source_config.get(field), field
    assert (back / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back, local_files_only=True)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert transformers.AutoTokenizer.from_pretrained(back).eos_token == "</s>"


def test_equivalence_cli_passes_on_converted_and_fails_on_perturbed(hf_dir, tmp_path, capsys):
    composer_pt = save_hf_to_composer(hf_dir, tmp_path / "model.pt")
    assert max_logit_difference(str(hf_dir), str(composer_pt)) <= 1e-5

    checkpoint = torch.load(composer_pt, weights_only=False)
    checkpoint["state"]["model"]["model.layers.1.mlp.w_up.weight"][0, 0] += 0.5
    torch.save(checkpoint, tmp_path / "perturbed.pt")
    assert equivalence_main([str(hf_dir), str(composer_pt)]) == 0
    assert ": OK" in capsys.readouterr().out
    assert equivalence_main([str(hf_dir), str(tmp_path / "perturbed.pt")]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_equivalence_module_entry_point(tmp_path):
    hf_dir = tmp_path / "hf"
    tiny_hf_llama().save_pretrained(hf_dir)
    composer_pt = save_hf_to_composer(hf_dir, tmp_path / "model.pt")
    result = subprocess.run([sys.executable, "-m", "llmhift.convert.compare_logits", str(hf_dir), str(composer_pt)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert ": OK" in result.stdout


def test_bare_state_dict_needs_only_the_shapes(tmp_path):
    torch.manual_seed(0)
    config = dict(vocab_size=300, d_model=256, n_layers=2, n_heads=2, n_kv_heads=1, intermediate_size=512)
    model = ComposerLlama(config)
    torch.save(model.state_dict(), tmp_path / "bare.pt")  # no config stored: head_dim 128 is inferred
    out = save_composer_to_hf(tmp_path / "bare.pt", tmp_path / "hf", dtype="bf16")
    hf_config = json.loads((out / "config.json").read_text())
    assert (hf_config["num_attention_heads"], hf_config["num_key_value_heads"], hf_config["head_dim"]) == (2, 1, 128)
    assert hf_config["torch_dtype"] == "bfloat16"
    tensors = hf_tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    expected = model.state_dict()["model.layers.1.attn.wk.weight"].to(torch.bfloat16)
    assert torch.equal(tensors["model.layers.1.self_attn.k_proj.weight"], expected)


def test_overrides_fill_what_shapes_cannot_tell(tmp_path):
    model = ComposerLlama(dict(vocab_size=50, d_model=64, n_layers=1, n_heads=4, intermediate_size=96))
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ConversionError, match="pass n_heads="):
        save_composer_to_hf(tmp_path / "bare.pt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    out = save_composer_to_hf(tmp_path / "bare.pt", tmp_path / "hf", n_heads=4, rope_theta=20000.0)
    hf_config = json.loads((out / "config.json").read_text())
    assert (hf_config["num_attention_heads"], hf_config["rope_theta"]) == (4, 20000.0)


def run_cli(*args):
    """The CLI in-process (a subprocess pays ~4 s of imports); one test below runs the real `-m`."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        returncode = composer_to_hf.main([str(a) for a in args])
    return subprocess.CompletedProcess(args, returncode, stdout.getvalue(), stderr.getvalue())


def test_module_entry_point(checkpoint, tmp_path):
    result = subprocess.run([sys.executable, "-m", "llmhift.convert.composer_to_hf", "save_composer_to_hf",
                             str(checkpoint), str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_other_architecture_is_refused(tmp_path):
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    assert_one_line_error(run_cli("save_hf_to_composer", gpt2, tmp_path / "out.pt"), "model_type 'gpt2'")
    # The same weights wrapped as a Composer checkpoint: named key by key.
    torch.save({"state": {"model": {f"model.{k}": v for k, v in load_file(gpt2 / "model.safetensors").items()}}},
               tmp_path / "gpt2.pt")
    assert_one_line_error(run_cli("save_composer_to_hf", tmp_path / "gpt2.pt", tmp_path / "hf"),
                          "not a ComposerLlama state dict")
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "hf").exists()
    assert leftovers(tmp_path) == []


@pytest.fixture
def checkpoint(tmp_path):
    hf = tmp_path / "hf"
    tiny_hf_llama().save_pretrained(hf)
    return save_hf_to_composer(hf, tmp_path / "model.pt")


def edited(checkpoint, edit):
    state = torch.load(checkpoint, weights_only=False)
    edit(state["state"]["model"])
    path = checkpoint.with_name("edited.pt")
    torch.save(state, path)
    return path


def test_missing_key_is_named(checkpoint, tmp_path):
    path = edited(checkpoint, lambda sd: sd.pop("model.layers.2.mlp.w_up.weight"))
    assert_one_line_error(run_cli("save_composer_to_hf", path, tmp_path / "out"), "model.layers.2.mlp.w_up.weight")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_extra_key_is_named(checkpoint, tmp_path):
    path = edited(checkpoint, lambda sd: sd.update({"model.layers.0.attn.bias": torch.zeros(3)}))
    assert_one_line_error(run_cli("save_composer_to_hf", path, tmp_path / "out"), "model.layers.0.attn.bias")
    assert not (tmp_path / "out").exists()


def test_override_contradicting_shapes_is_refused(checkpoint, tmp_path):
    result = run_cli("save_composer_to_hf", checkpoint, tmp_path / "out", "n_kv_heads=2", "n_heads=4")
    assert_one_line_error(result, "n_kv_heads=2 contradicts the weights", "n_kv_heads=4")
    result = run_cli("save_composer_to_hf", checkpoint, tmp_path / "out", "intermediate_size=100")
    assert_one_line_error(result, "intermediate_size=100 contradicts")
    assert not (tmp_path / "out").exists()


def test_unwritable_destination_is_refused_before_work(checkpoint, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert_one_line_error(run_cli("save_composer_to_hf", checkpoint, blocker / "out"), "is not a directory")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    assert_one_line_error(run_cli("save_composer_to_hf", checkpoint, tmp_path / "full"), "not written by save_composer_to_hf")
    assert (tmp_path / "full" / "keep.txt").read_text() == "precious"
    assert_one_line_error(run_cli("save_hf_to_composer", tmp_path / "hf", checkpoint), "overwrite=true")
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_only_after_success(checkpoint, tmp_path):
    out = tmp_path / "out"
    assert run_cli("save_composer_to_hf", checkpoint, out).returncode == 0
    first = hf_tensors(out)
    assert run_cli("save_composer_to_hf", checkpoint, out, "overwrite=true", "dtype=fp16").returncode == 0
    assert all(t.dtype == torch.float16 for t in hf_tensors(out).values())
    assert sorted(hf_tensors(out)) == sorted(first)
    assert leftovers(tmp_path) == []


def test_interrupted_write_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("llmhift.convert.composer_to_hf.write_hf_weights", crash)
    with pytest.raises(KeyboardInterrupt):
        save_composer_to_hf(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_sharded_output_reloads(checkpoint, tmp_path, monkeypatch):
    from llmhift.checkpoint import io as checkpoints

    original = checkpoints.write_hf_weights
    monkeypatch.setattr("llmhift.convert.composer_to_hf.write_hf_weights",
                        lambda weights, out: original(weights, out, max_shard_bytes=60_000))
    out = save_composer_to_hf(checkpoint, tmp_path / "sharded")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = save_hf_to_composer(out, tmp_path / "again.pt")
    _, first, _ = load_llama_checkpoint(checkpoint)
    _, second, _ = load_llama_checkpoint(back)
    assert all(torch.equal(first[k], second[k]) for k in first) and sorted(first) == sorted(second)


def test_wrapped_hf_checkpoint_with_a_tied_head_converts(tmp_path):
    """ComposerHFCausalLM checkpoints hold HF names under `model.`, the tied head as a second key
    on the embedding's storage; it must count as tied, not as an extra weight."""
    from llmhift.models.hf_causal_lm import ComposerHFCausalLM

    hf = tiny_hf_llama(tie_word_embeddings=True)
    wrapped = ComposerHFCausalLM(hf)
    torch.save({"state": {"model": wrapped.state_dict()}}, tmp_path / "wrapped.pt")
    out = save_composer_to_hf(tmp_path / "wrapped.pt", tmp_path / "hf", n_heads=4)
    tensors = hf_tensors(out)
    assert "lm_head.weight" not in tensors
    assert torch.equal(tensors["model.embed_tokens.weight"], hf.model.embed_tokens.weight)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


@pytest.mark.parametrize("rope_parameters, theta, scaling", [
    ({"rope_type": "default", "rope_theta": 100000.0}, 100000.0, None),
    ({**LLAMA31_SCALING, "rope_theta": 500000.0}, 500000.0, LLAMA31_SCALING),
])
def test_transformers5_rope_parameters_are_read(rope_parameters, theta, scaling):
    """transformers 5.x writes theta and scaling as one `rope_parameters` dict; the old top-level keys
    are absent, so reading only them would build a model with theta 10000."""
    hf = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                                  num_attention_heads=4).to_dict()
    for key in ("rope_theta", "rope_scaling"):
        hf.pop(key, None)
    config = llama_config_from_hf({**hf, "rope_parameters": rope_parameters})
    assert config.rope_theta == theta
    assert config.rope_scaling == scaling
