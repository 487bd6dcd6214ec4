"""ComposerHFCausalLM: loss equal to HF's own, extra batch keys, FLOP count, a real Composer fit."""

from __future__ import annotations

import doctest
import math
from typing import Callable

import pytest
import torch
from composer import Trainer
from composer.callbacks import SpeedMonitor
from composer.loggers import InMemoryLogger
from torch.utils.data import DataLoader
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from llmhift.models import hf_causal_lm
from llmhift.models.hf_causal_lm import ComposerHFCausalLM

VOCAB = 100


def tiny_llama() -> PreTrainedModel:
    # GQA (4 query heads, 2 key/value heads), untied head: the LLaMA-2/3 layout in miniature.
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2() -> PreTrainedModel:
    # Tied head and learned position embeddings (wpe).
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=16))


def tiny_opt() -> PreTrainedModel:
    # Tied head and learned positions through OPTLearnedPositionalEmbedding, an nn.Embedding subclass.
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
    )
    return OPTForCausalLM(config)


def tiny_qwen2() -> PreTrainedModel:
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config)


ARCHS: dict[str, Callable[[], PreTrainedModel]] = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "opt": tiny_opt,
    "qwen2": tiny_qwen2,
}


def build(arch: str, **kwargs) -> ComposerHFCausalLM:
    torch.manual_seed(0)
    return ComposerHFCausalLM(ARCHS[arch]().eval(), **kwargs)  # eval: no dropout, so two forwards agree


def token_batch(batch_size: int = 2, seq_len: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(3, VOCAB, (batch_size, seq_len), generator=generator)}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_loss_equals_hf_loss(arch: str) -> None:
    model = build(arch)
    batch = token_batch()
    with torch.no_grad():
        expected = model.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        actual = model.loss(model(batch), batch)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_loss_equals_hf_loss_with_masked_labels_and_padding(arch: str) -> None:
    model = build(arch)
    batch = token_batch()
    labels = batch["input_ids"].clone()
    labels[:, :3] = -100  # a prompt that takes no loss
    attention_mask = torch.ones_like(labels)
    attention_mask[1, -2:] = 0  # right padding of the second sequence
    labels[1, -2:] = -100
    batch.update(labels=labels, attention_mask=attention_mask)
    with torch.no_grad():
        expected = model.model(input_ids=batch["input_ids"], attention_mask=attention_mask, labels=labels).loss
        actual = model.loss(model(batch), batch)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_extra_batch_keys_are_kept_out_of_the_hf_call() -> None:
    model = build("llama")
    batch = token_batch()
    with_domain = {**batch, "domain_idx": torch.tensor([0, 1]), "labels": batch["input_ids"]}
    hf_kwargs = []
    model.model.register_forward_pre_hook(lambda _, args, kwargs: hf_kwargs.append(set(kwargs)), with_kwargs=True)
    with torch.no_grad():
        logits = model(with_domain)
        eval_logits = model.eval_forward(with_domain)
        reference = model(batch)
    assert hf_kwargs == 3 * [{"input_ids", "attention_mask", "use_cache"}]  # no labels: no HF loss
    assert logits.shape == (2, 8, VOCAB)
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    torch.testing.assert_close(eval_logits, reference, rtol=0, atol=0)
    assert model.eval_forward(with_domain, logits) is logits  # train metrics reuse the train forward
    for metric in model.get_metrics(is_train=False).values():
        model.update_metric(with_domain, eval_logits, metric)
        assert math.isfinite(float(metric.compute()))


def test_flops_per_batch_gpt2_tied() -> None:
    model = build("gpt2")
    d, ff, n_layers, vocab = 32, 4 * 32, 2, VOCAB
    block = (
        2 * d  # ln_1
        + d * 3 * d + 3 * d  # attn.c_attn
        + d * d + d  # attn.c_proj
        + 2 * d  # ln_2
        + d * ff + ff  # mlp.c_fc
        + ff * d + d  # mlp.c_proj
    )
    assert block == 12704
    # wte is the LM head too, so it counts (once); wpe is a lookup and does not.
    matmul_params = vocab * d + n_layers * block + 2 * d  # + ln_f
    assert model.matmul_params == matmul_params == 28672
    batch_size, seq_len = 2, 8
    dense = 6 * matmul_params * batch_size * seq_len  # 2,752,512
    attention = 12 * n_layers * d * seq_len**2 * batch_size  # 98,304
    assert model.flops_per_batch(token_batch(batch_size, seq_len)) == dense + attention == 2_850_816


def test_flops_per_batch_llama_untied_gqa() -> None:
    model = build("llama")
    d, ff, n_layers, kv_dim, vocab = 32, 64, 2, 2 * 8, VOCAB  # 2 kv heads of head_dim 32 / 4
    layer = (
        d * d  # q_proj
        + 2 * d * kv_dim  # k_proj, v_proj
        + d * d  # o_proj
        + 3 * d * ff  # gate_proj, up_proj, down_proj
        + 2 * d  # input_layernorm, post_attention_layernorm
    )
    assert layer == 9280
    # embed_tokens is a lookup; the untied lm_head is a matmul.
    matmul_params = vocab * d + n_layers * layer + d  # lm_head, layers, final norm
    assert model.matmul_params == matmul_params == 21792
    assert model.flops_per_batch(token_batch(2, 8)) == 6 * 21792 * 16 + 12 * 2 * 32 * 64 * 2 == 2_190_336


def test_opt_learned_positions_are_not_matmul_params() -> None:
    model = build("opt")
    hf = model.model
    assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight  # tied
    positions = hf.model.decoder.embed_positions.weight
    assert positions.shape == (32 + 2, 32)  # OPT offsets positions by 2
    assert model.matmul_params == sum(p.numel() for p in hf.parameters()) - positions.numel()


def test_missing_layer_count_is_an_error() -> None:
    torch.manual_seed(0)
    hf = tiny_llama()
    del hf.config.num_hidden_layers
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ComposerHFCausalLM(hf)


def test_train_metrics_off_by_default() -> None:
    assert build("llama").get_metrics(is_train=True) == {}
    assert set(build("llama", train_metrics=True).get_metrics(is_train=True)) == {
        "LanguageCrossEntropy",
        "LanguagePerplexity",
    }


def test_composer_fit_logs_loss_eval_metrics_and_mfu(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = build("llama")
    generator = torch.Generator().manual_seed(2)
    samples = [
        {"input_ids": torch.randint(VOCAB, (16,), generator=generator), "domain_idx": torch.tensor(i % 2)}
        for i in range(16)
    ]
    logger = InMemoryLogger()
    # On CPU SpeedMonitor finds no peak FLOP/s (it uses 0 and skips MFU), so give one; a window of 2
    # batches makes it log from the third batch on instead of the default hundred-and-first.
    peak_flops = 1e12
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(samples, batch_size=4),
        eval_dataloader=DataLoader(samples[:8], batch_size=4),
        eval_interval="2ba",
        max_duration="4ba",
        device="cpu",
        precision="fp32",
        loggers=[logger],
        callbacks=[SpeedMonitor(window_size=2, gpu_flops_available=peak_flops)],
        progress_bar=False,
        seed=0,
    )
    trainer.fit()

    losses = [float(value) for _, value in logger.data["loss/train/total"]]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert math.isfinite(float(trainer.state.eval_metric_values["LanguageCrossEntropy"]))
    assert len(logger.data["metrics/eval/LanguageCrossEntropy"]) == 2  # at 2ba and 4ba
    assert not any(key.startswith("metrics/train/") for key in logger.data)
    flops_per_sec = [value for _, value in logger.data["throughput/device/flops_per_sec"]]
    mfu = [value for _, value in logger.data["throughput/device/mfu"]]
    assert len(flops_per_sec) == len(mfu) == 2  # batches 3 and 4
    assert mfu == pytest.approx([f / peak_flops for f in flops_per_sec])


def test_from_pretrained_round_trip(tmp_path) -> None:
    model = build("llama")
    model.model.save_pretrained(tmp_path)
    loaded = ComposerHFCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert loaded.model.config._attn_implementation == "eager"
    batch = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model(batch), rtol=0, atol=1e-6)
    assert loaded.matmul_params == model.matmul_params


def test_from_pretrained_without_config_names_the_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        ComposerHFCausalLM.from_pretrained(tmp_path / "no-such-model")
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(FileNotFoundError, match="empty-folder"):
        ComposerHFCausalLM.from_pretrained(tmp_path / "empty-folder")


def test_docstring_example_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    # every one of the 8 example lines ran and passed: deleting examples fails here too
    assert doctest.testmod(hf_causal_lm, raise_on_error=True) == doctest.TestResults(failed=0, attempted=8)


@pytest.mark.parametrize("arch", [*ARCHS, "llmhift"])
def test_composer_fsdp_shards_each_decoder_block_as_a_unit(arch: str) -> None:
    """The units Composer's own FSDP2 policy picks (FSDP1 reads the same hooks): the wrapped model and
    each of its decoder blocks, nothing else; activation checkpointing picks the blocks."""
    from composer.distributed.activation_checkpointing import generate_composer_model_check_fn
    from composer.distributed.fsdp2_utils import generate_composer_model_policy

    from llmhift.models.llama import Block, ComposerLlama

    if arch == "llmhift":
        model = ComposerLlama(dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, intermediate_size=64))
        blocks = [m for m in model.modules() if isinstance(m, Block)]
    else:
        model = build(arch)
        blocks = [m for m in model.modules() if type(m).__name__ in model.model._no_split_modules]
    # _run_policy is private, but it is exactly what Composer's apply_fully_shard calls to pick the units:
    # asking it avoids a 2-process FSDP launch just to read the wrapped classes.
    units = generate_composer_model_policy(model)._run_policy(root_module=model, ignored_modules=set(), root_kwargs={})
    assert len(blocks) == 2 and list(units) == [model.model, *blocks]
    recomputed = generate_composer_model_check_fn(model)
    assert [m for m in model.modules() if recomputed(m)] == blocks
