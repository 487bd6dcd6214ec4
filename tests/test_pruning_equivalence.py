"""Masked model == physically pruned model (full logits), and the pruned checkpoint == its HF export."""

import itertools

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from llmhift.convert.composer_to_hf import save_composer_to_hf
from llmhift.convert.post_pruning import main, prune_and_save_model, prune_llama_weights
from llmhift.models.hf_adapter import ConversionError
from llmhift.models.l0_module import L0Module
from llmhift.models.llama import MASK_NAMES, ComposerLlama, LlamaConfig

L, H, D, I, V = 4, 4, 32, 48, 64


class FixedMasks(torch.nn.Module):
    def __init__(self, masks):
        super().__init__()
        self.masks = masks

    def forward(self):
        return self.masks


def config(kv, tied):
    return LlamaConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=H, n_kv_heads=kv, intermediate_size=I,
                       tie_word_embeddings=tied, attn_impl="eager")


def structural_masks(kv, seed=1):
    """Soft-valued masks that remove: half the KV groups per layer, every head of layer 1 (its attention
    goes), layer 3's attention (head_layer) and layer 2's MLP (mlp), layer 1 whole (layer), 12 of 32
    hidden dimensions and 28 of 48 channels per layer."""
    g = torch.Generator().manual_seed(seed)

    def soft(*shape):
        return torch.rand(*shape, generator=g) * 0.8 + 0.2

    def keep(rows, size, k):
        mask = torch.zeros(rows, size)
        for row in mask:
            row[torch.randperm(size, generator=g)[:k]] = 1
        return mask * soft(rows, size)

    head = keep(L, kv, max(1, kv // 2))
    head[1] = 0
    return {
        "head": head.repeat_interleave(H // kv, dim=-1),  # (L, H)
        "head_layer": soft(L) * torch.tensor([1.0, 1.0, 1.0, 0.0]),
        "intermediate": keep(L, I, 20),
        "mlp": soft(L) * torch.tensor([1.0, 1.0, 0.0, 1.0]),
        "hidden": keep(1, D, 20)[0],
        "layer": soft(L) * torch.tensor([1.0, 0.0, 1.0, 1.0]),
    }


def logits(model, ids):
    with torch.no_grad():
        return model.eval()({"input_ids": ids})


@pytest.mark.slow
@pytest.mark.parametrize("kv, tied", [(4, False), (2, True), (2, False)], ids=["mha", "gqa-tied", "gqa"])
def test_masked_equals_pruned_for_every_combination_of_masks(kv, tied):
    torch.manual_seed(0)
    source = config(kv, tied)
    weights = ComposerLlama(source).state_dict()
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(2))
    every = structural_masks(kv)
    seen = set()
    for r in range(1, len(MASK_NAMES) + 1):
        for names in itertools.combinations(MASK_NAMES, r):
            masks = {name: every[name] for name in names}
            masked = ComposerLlama(source, mask_source=FixedMasks(masks))
            masked.load_state_dict(weights, strict=True)
            pruned_config, pruned_weights = prune_llama_weights(weights, source, masks)
            pruned = ComposerLlama(pruned_config)
            pruned.load_state_dict(pruned_weights, strict=True)
            torch.testing.assert_close(logits(pruned, ids), logits(masked, ids), rtol=0, atol=1e-5)
            seen.add((pruned_config.n_layers, tuple(pruned_config.layers_without_attn),
                      tuple(pruned_config.layers_without_mlp)))
    # The set really exercised removed layers, attention-free and MLP-free layers.
    assert (3, (2,), (1,)) in seen  # layer 1 gone; old layer 3 without attention, old layer 2 without MLP
    assert (4, (1, 3), (2,)) in seen  # no layer gate: layer 1 loses every head, layer 3 its head_layer


def test_layers_with_different_counts_are_refused():
    source = config(4, False)
    head = torch.ones(L, H)
    head[0, :2] = 0
    with pytest.raises(ConversionError, match="different numbers of key/value heads"):
        prune_llama_weights(ComposerLlama(source).state_dict(), source, {"head": head})


def pruning_checkpoint(tmp_path, kv, tied, modules, target):
    """A masked model with scattered log-alphas, saved as train.py would: checkpoint + config.yaml."""
    torch.manual_seed(0)
    source = config(kv, tied)
    l0 = L0Module(source, target, modules, eval_target_model=True)
    with torch.no_grad():
        for z in l0.z_loga.values():
            z.normal_(0.0, 3.0)
    model = ComposerLlama(source, mask_source=l0)
    run = {"model": {"name": "llama", **source.to_dict(), "l0_module": {"pruning_modules": modules,
                                                                          "target_model": target}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(run))
    torch.save({"state": {"model": model.state_dict()}, "rng": None}, tmp_path / "ep0-ba4-rank0.pt")
    (tmp_path / "latest-rank0.pt").symlink_to("ep0-ba4-rank0.pt")
    return model, tmp_path / "latest-rank0.pt"


@pytest.mark.parametrize("kv, tied", [(4, False), (2, True)], ids=["mha", "gqa-tied"])
def test_pruned_checkpoint_converts_to_hf_with_the_target_shape_and_the_same_logits(tmp_path, kv, tied):
    target = {"d_model": 24, "n_kv_heads": kv // 2, "n_layers": 3, "intermediate_size": 20}
    modules = ["head", "intermediate", "layer", "hidden", "head_layer", "mlp"]
    masked, ckpt = pruning_checkpoint(tmp_path, kv, tied, modules, target)
    assert main(["prune_and_save_model", str(ckpt)]) == 0
    pruned_path = tmp_path / "pruned-latest-rank0.pt"
    with pytest.raises(FileExistsError):
        prune_and_save_model(ckpt)
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))

    hf_dir = save_composer_to_hf(pruned_path, tmp_path / "hf")  # no shape typed anywhere
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    shape = hf.config
    assert (shape.hidden_size, shape.num_attention_heads, shape.num_key_value_heads, shape.num_hidden_layers,
            shape.intermediate_size) == (24, H // 2, kv // 2, 3, 20)
    with torch.no_grad():
        hf_logits = hf(ids).logits
    torch.testing.assert_close(hf_logits, logits(masked, ids), rtol=0, atol=1e-5)


def test_converters_refuse_masks_and_attention_free_layers(tmp_path):
    _, ckpt = pruning_checkpoint(tmp_path, 4, False, ["head"], {"n_heads": 2})
    with pytest.raises(ConversionError, match="still holds its L0 masks.*prune_and_save_model"):
        save_composer_to_hf(ckpt, tmp_path / "hf")
    source = config(4, False)
    head_layer = torch.tensor([1.0, 0.0, 1.0, 1.0])
    pruned_config, pruned = prune_llama_weights(ComposerLlama(source).state_dict(), source, {"head_layer": head_layer})
    assert pruned_config.layers_without_attn == [1]
    (tmp_path / "bare").mkdir()
    torch.save({"state": {"model": pruned}}, tmp_path / "bare" / "attn_free.pt")
    with pytest.raises(ConversionError, match=r"layers \[1\] have no attention sublayer"):
        save_composer_to_hf(tmp_path / "bare" / "attn_free.pt", tmp_path / "hf2", n_heads=4)


def test_a_mask_of_the_wrong_shape_is_refused_naming_it():
    source = config(2, False)
    with pytest.raises(ConversionError, match=rf"mask 'head' has shape \({L}, 2\); .* takes \({L}, {H}\)"):
        prune_llama_weights(ComposerLlama(source).state_dict(), source, {"head": torch.ones(L, 2)})  # per KV group
