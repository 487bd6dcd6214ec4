"""Contracts between modules that are names with one owner: DDP unwrapping, the architecture part of a model
section, the atomic replace of a shared file, one disk-full error."""

import errno

import pytest
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from llmhift.atomic import NoSpaceError, atomic_replace
from llmhift.checkpoint.run_folder import DiskFullError
from llmhift.models.causal_lm import unwrap_model
from llmhift.models.llama import ComposerLlama, architecture, same_value

TINY = dict(vocab_size=64, d_model=16, n_layers=1, n_heads=2, intermediate_size=32)


def test_unwrap_model_takes_the_model_out_of_ddp_only(tmp_path):
    model = ComposerLlama(TINY)
    own_group = not torch_dist.is_initialized()  # an earlier Trainer in this process leaves Composer's group up
    if own_group:
        torch_dist.init_process_group("gloo", store=torch_dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                                      world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        assert unwrap_model(wrapped) is model
    finally:
        if own_group:
            torch_dist.destroy_process_group()
    assert unwrap_model(model) is model
    holder = torch.nn.Module()
    holder.module = torch.nn.Linear(2, 2)  # a model's own submodule named `module` is not a wrapper
    assert unwrap_model(holder) is holder


def test_architecture_is_the_weights_part_of_any_model_section():
    section = {"name": "llama", "pretrained": "hf/llama", "l0_module": {"pruning_modules": ["head"]}, "d_model": 64,
               "rope_theta": 5e5, "layers_without_mlp": [2, 0], "attn_impl": "eager", "init_std": 0.01,
               "activation_checkpointing": True}
    assert architecture(section) == {"d_model": 64, "rope_theta": 5e5, "layers_without_mlp": [2, 0]}
    full = ComposerLlama(TINY).config.to_dict()  # a stored model_config: all but the three run settings
    assert architecture(full) == {k: v for k, v in full.items()
                                  if k not in ("attn_impl", "activation_checkpointing", "init_std")}
    assert same_value([2, 0], [0, 2]) and same_value(1e5, 100000) and same_value(True, 1)
    assert not same_value([0, 2], [0, 1]) and not same_value(1e5, 1e4)


def test_atomic_replace_shows_the_file_whole_or_not_at_all(tmp_path):
    out = tmp_path / "shard.mds"
    with pytest.raises(RuntimeError, match="cut"):
        with atomic_replace(out) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("download cut")
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temp file
    for content in (b"first copy", b"second copy"):  # a concurrent writer's copy replaces, never refused
        with atomic_replace(out) as tmp:
            tmp.write_bytes(content)
        assert out.read_bytes() == content and list(tmp_path.iterdir()) == [out]

    def taken() -> None:
        raise FileExistsError(f"{out} is taken")

    with pytest.raises(FileExistsError, match="taken"):  # `check` may still refuse the rename at the end
        with atomic_replace(out, check=taken) as tmp:
            tmp.write_bytes(b"third")
    assert out.read_bytes() == b"second copy" and list(tmp_path.iterdir()) == [out]


def test_a_full_disk_is_one_error_class_with_the_writers_message(tmp_path):
    assert DiskFullError is NoSpaceError  # train.py and users that catch the checkpoint's name still do
    generic = NoSpaceError(tmp_path / "out.pt", needs=1000)
    assert str(generic).startswith(f"no space left on device writing {tmp_path / 'out.pt'} (needs about 1,000 bytes, ")
    own = NoSpaceError(tmp_path, message=f"save_folder: {tmp_path}: no space left on device writing a checkpoint")
    assert str(own) == f"save_folder: {tmp_path}: no space left on device writing a checkpoint"
    assert isinstance(own, OSError) and own.errno == errno.ENOSPC
