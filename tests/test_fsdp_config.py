"""What the yamls' ``fsdp_config`` becomes for Composer: FSDP2 unless FSDP_VERSION=1, FSDP1 strategies
translated, and the settings FSDP2 cannot honour refused with the key named."""

from __future__ import annotations

import warnings

import pytest
from composer.utils import FSDP2Config

from llmhift.build.config import ConfigError, load_config
from llmhift.build.parallel import parallelism_config

SHARDED_YAMLS = [
    "yamls/pruning/llama2_7b_to_1.3b.yaml",
    "yamls/pruning/llama2_7b_to_2.7b.yaml",
    "yamls/pruning/llama3_8b_gqa_example.yaml",
    "yamls/pretrain/llama2_1.3b.yaml",
    "yamls/pretrain/llama2_2.7b.yaml",
]


@pytest.mark.parametrize("yaml", SHARDED_YAMLS)
def test_recipes_become_fsdp2_bf16_sharded_without_ignored_keys(yaml, monkeypatch):
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Composer warns for every key FSDP2 would ignore
        warnings.filterwarnings("ignore", message="FSDP2 Config/APIs are experimental")
        fsdp = parallelism_config(load_config(yaml))["fsdp"]
    assert isinstance(fsdp, FSDP2Config)
    assert (fsdp.mixed_precision, fsdp.reshard_after_forward, fsdp.state_dict_type) == ("PURE", True, "sharded")


def fsdp(overrides: list[str], yaml: str = SHARDED_YAMLS[0]) -> FSDP2Config:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return parallelism_config(load_config(yaml, overrides))["fsdp"]


def test_shard_grad_op_keeps_blocks_gathered_between_forward_and_backward(monkeypatch):
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    assert fsdp(["fsdp_config.sharding_strategy=SHARD_GRAD_OP"]).reshard_after_forward is False
    unsharded_yaml = "yamls/demo/pretrain.yaml"  # no fsdp_config of its own: FSDP2's key alone
    assert fsdp(["fsdp_config={reshard_after_forward: false}"], unsharded_yaml).reshard_after_forward is False


@pytest.mark.parametrize("overrides, key", [
    (["fsdp_config.sharding_strategy=HYBRID_SHARD"], "fsdp_config.sharding_strategy"),
    (["fsdp_config.reshard_after_forward=false"], "fsdp_config.reshard_after_forward"),
])  # fmt: skip
def test_settings_fsdp2_cannot_honour_are_refused(overrides, key, monkeypatch):
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    with pytest.raises(ConfigError, match=key):
        fsdp(overrides)


def test_fsdp1_on_cpu_names_the_fix(monkeypatch):
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="unset it to use FSDP2"):
        parallelism_config(load_config(SHARDED_YAMLS[0]))
