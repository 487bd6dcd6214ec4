"""``callbacks.hift.param_dtype`` takes effect when train.py builds the model, on the CPU: a 7B model must
not reach a 24 GB GPU in fp32 before HiFT casts it. Cast early or at INIT, the run is the same."""

from __future__ import annotations

import torch
from composer import Trainer
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from llmhift.build.config import config_from_dict
from llmhift.build.trainer import build_callbacks, build_model, build_optimizer
from llmhift.callbacks.hift import HiFTCallback
from llmhift.models.hf_adapter import hf_to_llmhift_state_dict
from tests.test_hift import Tokens

SHAPE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, max_seq_len=16)


def config(param_dtype: str | None, **model):
    hift = {"group_element": 1, "optimizer_state": "keep"} | ({"param_dtype": param_dtype} if param_dtype else {})
    return config_from_dict({
        "model": {"name": "llama", **(model or SHAPE)}, "callbacks": {"hift": hift}, "precision": "fp32",
        "max_duration": "6ba", "train_loader": {"dataset": {"local": "unused", "max_seq_len": 16}},
        "global_train_batch_size": 8, "device_train_microbatch_size": 8, "optimizer": {"name": "adamw", "lr": 1e-2},
    })


def built(param_dtype: str | None, **model):
    torch.manual_seed(0)
    return build_model(config(param_dtype, **model))


def test_weights_are_stored_in_param_dtype_when_built():
    stored, full = built("bfloat16"), built(None)
    assert {p.dtype for p in stored.parameters()} == {torch.bfloat16}
    full_params = dict(full.named_parameters())
    for name, param in stored.named_parameters():  # the same rounding HiFT applies at INIT
        assert torch.equal(param, full_params[name].to(torch.bfloat16)), name
    for (name, buffer), full_buffer in zip(stored.named_buffers(), full.buffers()):
        assert buffer.dtype == full_buffer.dtype, name  # buffers (rotary tables) keep their precision


def test_a_pretrained_checkpoint_is_read_straight_into_param_dtype(tmp_path):
    torch.manual_seed(1)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16))
    hf.save_pretrained(tmp_path / "hf")
    model = built("bfloat16", pretrained=str(tmp_path / "hf"))
    ours = dict(model.named_parameters())
    assert {p.dtype for p in ours.values()} == {torch.bfloat16}
    expected = hf_to_llmhift_state_dict(hf.state_dict(), tie_word_embeddings=False)
    assert expected.keys() == ours.keys()
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor.to(torch.bfloat16)), name


def fit(model, param_dtype: str) -> dict[str, torch.Tensor]:
    run = config(param_dtype)
    callbacks = build_callbacks(run)
    Trainer(model=model, optimizers=build_optimizer(run, model), callbacks=callbacks,
            train_dataloader=DataLoader(Tokens(n=48), batch_size=8), max_duration=run.max_duration, device="cpu",
            precision="fp32", seed=17, progress_bar=False, log_to_console=False).fit()
    assert any(isinstance(c, HiFTCallback) for c in callbacks)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_training_equals_the_run_where_hift_casts_at_init():
    early = fit(built("bfloat16"), "bfloat16")
    at_init = fit(built(None), "bfloat16")  # an fp32 model: HiFTCallback casts it at INIT, as before
    assert early.keys() == at_init.keys()
    for name, tensor in early.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, at_init[name]), name
    assert not torch.equal(early["model.lm_head.weight"], built("bfloat16").model.lm_head.weight)  # it trained
