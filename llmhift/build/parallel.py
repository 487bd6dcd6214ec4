"""Where the ranks run: FSDP version and config from the yaml, and the gloo gradient fix for CPU ranks."""

from __future__ import annotations

import os
from typing import Any

import torch
from composer.utils import FSDP2Config, dist
from torch.distributed.fsdp import FSDPModule

from llmhift.build.config import ConfigError, TrainConfig

__all__ = ["RESHARD_AFTER_FORWARD", "on_gpu", "fsdp_version", "parallelism_config", "average_gloo_fsdp2_gradients"]


def on_gpu() -> bool:
    return torch.cuda.is_available()


def average_gloo_fsdp2_gradients(model: torch.nn.Module) -> None:
    """FSDP2 averages gradients with a reduce-scatter asking for ``ReduceOp.AVG``, which torch 2.7's gloo
    backend silently treats as a sum (pytorch/pytorch#162338): CPU ranks would step with world-size times
    the gradient. Where a one-element probe shows the sum, FSDP2 divides right after its reduce-scatter."""
    if not any(isinstance(m, FSDPModule) for m in model.modules()) or torch.distributed.get_backend() != "gloo":
        return
    world = dist.get_world_size()
    probe = torch.empty(1)
    torch.distributed.reduce_scatter_tensor(probe, torch.ones(world), op=torch.distributed.ReduceOp.AVG)
    if probe.item() == world:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_all_reduce_hook(lambda grad: grad.div_(world))


def fsdp_version() -> int:
    """FSDP2 unless ``FSDP_VERSION=1``: its per-parameter sharding lets HiFT freeze and unfreeze single
    tensors and lets the pruning callback read the L0 module, which FSDP1's flat parameters hide, and
    it is the FSDP that runs on CPU. Composer's own default is FSDP1; llmhift's train.py is not."""
    return 1 if os.environ.get("FSDP_VERSION", "2") == "1" else 2


# FSDP1's sharding strategies in FSDP2's terms: FSDP2 always shards parameters, gradients and optimizer
# state; it can keep a block's gathered parameters from forward to backward (SHARD_GRAD_OP's trade).
RESHARD_AFTER_FORWARD = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}


def parallelism_config(config: TrainConfig) -> dict[str, Any] | None:
    """Composer's ``parallelism_config`` for the yaml's ``fsdp_config``: an FSDP2Config unless FSDP_VERSION=1."""
    if not config.fsdp_config:
        return None
    fsdp = dict(config.fsdp_config)
    if fsdp_version() == 1:
        if not on_gpu():
            raise ConfigError("fsdp_config: FSDP_VERSION=1 (Composer's FSDP1) needs CUDA; unset it to use FSDP2")
        # build_model leaves ranks > 0 on the meta device; FSDP1 fills them from rank 0 only when told.
        fsdp.setdefault("sync_module_states", True)
        return {"fsdp": fsdp}
    strategy = fsdp.pop("sharding_strategy", "FULL_SHARD")
    if strategy not in RESHARD_AFTER_FORWARD:
        raise ConfigError(
            f"fsdp_config.sharding_strategy: {strategy!r} has no FSDP2 equivalent; use one of "
            f"{sorted(RESHARD_AFTER_FORWARD)} (or FSDP_VERSION=1 on GPUs)"
        )
    reshard = fsdp.setdefault("reshard_after_forward", RESHARD_AFTER_FORWARD[strategy])
    if "sharding_strategy" in config.fsdp_config and reshard != RESHARD_AFTER_FORWARD[strategy]:
        raise ConfigError(
            f"fsdp_config.reshard_after_forward: {reshard} contradicts sharding_strategy {strategy}; set only one"
        )
    # FSDP2 decides by itself to broadcast rank 0's weights when the other ranks are on meta.
    fsdp.pop("sync_module_states", None)
    return {"fsdp": FSDP2Config.from_compatible_attrs(fsdp)}
