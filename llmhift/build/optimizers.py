"""The optimizers a yaml can name (``optimizer.name``): how each is built from ``OptimizerConfig``, what it
needs installed, where it may run, and the bytes of state it keeps per parameter (the memory estimate's).

One registry, :data:`OPTIMIZERS`, so that the config check, the Trainer build and the dry run's
estimate cannot disagree on a name. Every check runs before the model is built and before anything is
written: an unknown name, a hyperparameter out of range, a package that is not installed, a GPU-only
optimizer on a CPU machine, or an optimizer that cannot train L0 pruning's Lagrange multipliers at a
negative rate (``pruning_param_groups``) is one ConfigError line naming the key and the fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from composer.optim import DecoupledAdamW

from llmhift.build.config import ConfigError, OptimizerConfig

__all__ = ["OptimizerSpec", "OPTIMIZERS", "check_optimizer", "check_installed", "make_optimizer", "optimizer_state_bytes"]

FP32 = 4
BNB_BLOCK = 256  # bitsandbytes' 8-bit optimizers keep one fp32 absmax per block of this many values
BNB_MIN_8BIT = 4096  # ... and 32-bit state for tensors smaller than this (its min_8bit_size)


def _adam_state(shape: torch.Size, opt: OptimizerConfig) -> int:
    return 2 * shape.numel() * FP32 + FP32  # exp_avg, exp_avg_sq, a step tensor


def _sgd_state(shape: torch.Size, opt: OptimizerConfig) -> int:
    return shape.numel() * FP32 if opt.momentum else 0  # momentum_buffer; plain SGD keeps nothing


def _one_moment(shape: torch.Size, opt: OptimizerConfig) -> int:
    return shape.numel() * FP32 + FP32  # Adagrad's sum and step


def _lion_state(shape: torch.Size, opt: OptimizerConfig) -> int:
    return shape.numel() * FP32  # exp_avg only: Lion keeps no step


def _adafactor_state(shape: torch.Size, opt: OptimizerConfig) -> int:
    """torch.optim.Adafactor factors a matrix's second moment over its last two dimensions: one value
    per row (``row_var``, shape[:-1] + (1,)) and one per column (``col_var``); a vector keeps a full
    ``variance``."""
    if len(shape) < 2:
        return shape.numel() * FP32 + FP32
    lead = math.prod(shape[:-2])
    return lead * (shape[-2] + shape[-1]) * FP32 + FP32


def _bnb_state(moments: int) -> Callable[[torch.Size, OptimizerConfig], int]:
    def state(shape: torch.Size, opt: OptimizerConfig) -> int:
        n = shape.numel()
        if n < BNB_MIN_8BIT:
            return moments * n * FP32 + FP32
        # one byte per value and moment, an fp32 absmax per block; the 256-entry quantization maps
        # are shared by every parameter (a few KiB in all)
        return moments * (n + math.ceil(n / BNB_BLOCK) * FP32) + FP32
    return state


def _adamw_kwargs(opt: OptimizerConfig) -> dict[str, Any]:
    return dict(lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)


def _lion_kwargs(opt: OptimizerConfig) -> dict[str, Any]:
    return dict(lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)


@dataclass(frozen=True)
class OptimizerSpec:
    """One ``optimizer.name``: ``build(params, config)``, the bytes of state per parameter of a shape,
    the module it imports and the pip extra that installs it, whether it needs CUDA, and whether a
    negative learning rate is gradient ascent at that rate (L0 pruning's Lagrange multipliers)."""

    build: Callable[[Any, OptimizerConfig], torch.optim.Optimizer]
    state: Callable[[torch.Size, OptimizerConfig], int]
    uses: tuple[str, ...]  # the OptimizerConfig fields it reads besides lr (the others must stay unset)
    package: Optional[str] = None
    extra: Optional[str] = None
    gpu_only: bool = False
    negative_lr: bool = True
    why_not_negative: str = ""


def _bnb(name: str) -> Callable[[Any, OptimizerConfig], torch.optim.Optimizer]:
    def build(params: Any, opt: OptimizerConfig) -> torch.optim.Optimizer:
        cls = getattr(importlib.import_module("bitsandbytes").optim, name)
        return cls(params, **(_lion_kwargs(opt) if "Lion" in name else _adamw_kwargs(opt)))
    return build


def _lion(params: Any, opt: OptimizerConfig) -> torch.optim.Optimizer:
    return importlib.import_module("lion_pytorch").Lion(params, **_lion_kwargs(opt))


_BNB_UNCHECKED = ("bitsandbytes' 8-bit update was not checked with a negative rate (it needs a GPU); use adamw, "
                  "decoupled_adamw, sgd, adagrad or lion")
_ADAM_FIELDS, _LION_FIELDS = ("betas", "eps", "weight_decay"), ("betas", "weight_decay")

OPTIMIZERS: dict[str, OptimizerSpec] = {
    "decoupled_adamw": OptimizerSpec(lambda p, o: DecoupledAdamW(p, **_adamw_kwargs(o)), _adam_state, _ADAM_FIELDS),
    "adamw": OptimizerSpec(lambda p, o: torch.optim.AdamW(p, **_adamw_kwargs(o)), _adam_state, _ADAM_FIELDS),
    "sgd": OptimizerSpec(
        lambda p, o: torch.optim.SGD(p, lr=o.lr, momentum=o.momentum or 0.0, nesterov=o.nesterov,
                                     weight_decay=o.weight_decay),
        _sgd_state, ("momentum", "nesterov", "weight_decay")),
    "adagrad": OptimizerSpec(lambda p, o: torch.optim.Adagrad(p, lr=o.lr, eps=o.eps, weight_decay=o.weight_decay),
                             _one_moment, ("eps", "weight_decay")),
    # torch's own (no extra): relative step size min(lr, 1/sqrt(step)), its default epsilons
    "adafactor": OptimizerSpec(
        lambda p, o: torch.optim.Adafactor(p, lr=o.lr, weight_decay=o.weight_decay), _adafactor_state,
        ("weight_decay",), negative_lr=False,
        why_not_negative="its step size is min(lr, 1/sqrt(step)), so lr = -lag_lr is not ascent at lag_lr; use "
                         "adamw, decoupled_adamw, sgd, adagrad or lion"),
    "lion": OptimizerSpec(_lion, _lion_state, _LION_FIELDS, package="lion_pytorch", extra="lion"),
    "adamw_8bit": OptimizerSpec(_bnb("AdamW8bit"), _bnb_state(2), _ADAM_FIELDS, "bitsandbytes", "gpu", True,
                                False, _BNB_UNCHECKED),
    "paged_adamw_8bit": OptimizerSpec(_bnb("PagedAdamW8bit"), _bnb_state(2), _ADAM_FIELDS, "bitsandbytes", "gpu",
                                      True, False, _BNB_UNCHECKED),
    "lion_8bit": OptimizerSpec(_bnb("Lion8bit"), _bnb_state(1), _LION_FIELDS, "bitsandbytes", "gpu", True, False,
                               _BNB_UNCHECKED),
    "paged_lion_8bit": OptimizerSpec(_bnb("PagedLion8bit"), _bnb_state(1), _LION_FIELDS, "bitsandbytes", "gpu",
                                     True, False, _BNB_UNCHECKED),
}
_DEFAULTS = OptimizerConfig()


def _spec(opt: OptimizerConfig) -> OptimizerSpec:
    if opt.name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name: {opt.name!r} is not one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[opt.name]


def check_optimizer(opt: OptimizerConfig, *, pruning: bool = False, on_gpu: Optional[bool] = None) -> None:
    """Every check of the ``optimizer`` section: the name, each hyperparameter's range and whether the
    named optimizer reads it, L0 pruning's negative rate (``pruning``: the yaml has ``model.l0_module``)
    and, unless ``on_gpu`` is None (a dry run away from the cluster), :func:`check_installed`."""
    spec = _spec(opt)
    unused = [key for key in ("momentum", "nesterov", "betas", "eps", "weight_decay")
              if key not in spec.uses and getattr(opt, key) != getattr(_DEFAULTS, key)]
    if unused:
        raise ConfigError(f"optimizer.{unused[0]}: {opt.name} does not use it; drop it (it uses lr"
                          + "".join(f", {k}" for k in spec.uses) + ")")
    if opt.lr < 0 or (opt.lr == 0 and opt.name == "lion"):  # lion_pytorch asserts lr > 0
        raise ConfigError(f"optimizer.lr: {opt.name} needs a {'positive' if opt.lr == 0 else 'non-negative'} "
                          f"learning rate, got {opt.lr}")
    if len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas):
        raise ConfigError(f"optimizer.betas: two values in [0, 1), got {list(opt.betas)}")
    if not opt.eps > 0:
        raise ConfigError(f"optimizer.eps: must be positive, got {opt.eps}")
    if opt.weight_decay < 0:
        raise ConfigError(f"optimizer.weight_decay: must be >= 0, got {opt.weight_decay}")
    if opt.momentum is not None and not 0 <= opt.momentum < 1:
        raise ConfigError(f"optimizer.momentum: must be in [0, 1), got {opt.momentum}")
    if opt.nesterov and not opt.momentum:
        raise ConfigError("optimizer.nesterov: needs a positive optimizer.momentum (e.g. 0.9)")
    if pruning and not spec.negative_lr:
        raise ConfigError(f"optimizer.name: {opt.name} cannot train L0 pruning's Lagrange multipliers at -lag_lr: "
                          f"{spec.why_not_negative}")
    if on_gpu is not None:
        check_installed(opt, on_gpu)


def check_installed(opt: OptimizerConfig, on_gpu: Optional[bool] = None) -> None:
    """What this machine must have for ``opt``: a CUDA GPU (``on_gpu``; None: not checked) for the
    bitsandbytes optimizers, and the optimizer's package. A dry run reports these as notes."""
    spec = _spec(opt)
    if spec.gpu_only and on_gpu is False:
        raise ConfigError(f"optimizer.name: {opt.name} (bitsandbytes) runs on CUDA GPUs only and this machine has "
                          "none; use adamw (or lion for the same update in 32 bits)")
    if spec.package and importlib.util.find_spec(spec.package) is None:
        raise ConfigError(f"optimizer.name: {opt.name} needs the {spec.package} package, which is not installed; "
                          f"pip install 'llmhift[{spec.extra}]'")


def make_optimizer(opt: OptimizerConfig, params: Any, pruning: bool = False) -> torch.optim.Optimizer:
    """The optimizer named by ``opt`` over ``params`` (tensors or param groups; ``pruning``: they are
    :func:`~llmhift.models.l0_module.pruning_param_groups`'), checked first."""
    check_optimizer(opt, pruning=pruning)
    check_installed(opt)
    return _spec(opt).build(params, opt)


def optimizer_state_bytes(opt: OptimizerConfig, shapes: Iterable[torch.Size]) -> int:
    """Bytes of optimizer state for parameters of these shapes, once every one has taken a step."""
    spec = _spec(opt)
    return sum(spec.state(torch.Size(shape), opt) for shape in shapes)
