"""Hard-concrete L0 masks that shrink a LLaMA toward a target shape (Sheared-LLaMA's targeted pruning)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule

from llmhift.models.llama import MASK_NAMES, LlamaConfig, LlamaModel

__all__ = [
    "L0Module",
    "PRUNING_MODULES",
    "TARGET_KEYS",
    "HELD_LR_KEY",
    "parse_steps",
    "count_params",
    "mask_shapes",
    "pruning_param_groups",
]

PRUNING_MODULES = ("head", "head_layer", "intermediate", "mlp", "hidden", "layer")
TARGET_KEYS = ("d_model", "n_heads", "n_kv_heads", "n_layers", "intermediate_size")

# Hard-concrete constants (Louizos et al. 2018): the stretch interval, sampling epsilon, temperature.
LIMIT_A, LIMIT_B, EPS, BETA = -0.1, 1.1, 1e-6, 2.0 / 3.0
# Bounds on log-alpha: keeps every gate's open-probability in a range where its gradient lives.
LOGA_MIN, LOGA_MAX = math.log(1e-2), math.log(1e2)
LOGA_INIT_MEAN, LOGA_INIT_STD = 5.0, 0.01
# Optimizer-group key of a learning rate the LR schedule must not scale: PruningCallback puts it back
# into the group's ``lr`` at every batch (Composer's schedulers scale every group alike). The value is
# the key checkpoints already hold, so their optimizer groups resume as they were saved.
HELD_LR_KEY = "fixed_lr"


def parse_steps(value: int | str, key: str) -> int:
    """An int or a Composer batch count ('640ba') -> a number of batches."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.endswith("ba") and value[:-2].isdigit():
        return int(value[:-2])
    raise ValueError(f"{key}: expected a batch count such as 640 or '640ba', got {value!r}")


def count_params(config: LlamaConfig) -> int:
    """Every parameter of a LlamaModel of this shape (embeddings, head and norms included)."""
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaModel(config).parameters())


def mask_shapes(config: LlamaConfig, tables: bool = False) -> dict[str, tuple[int, ...]]:
    """The shape of every mask of ``MASK_NAMES`` over a model of ``config``.

    By default the shapes ComposerLlama takes: ``head`` (L, H) per query head, ``intermediate`` (L, I),
    ``hidden`` (d,), ``layer``, ``head_layer`` and ``mlp`` (L,). With ``tables`` those of the L0Module's
    log-alpha tables, [rows, size]: one ``head`` gate per key/value group, (L, KV), so that a pruned GQA
    model stays GQA, and each vector as a single row. Everything that builds, defaults or checks a mask
    (the L0 module, post-pruning) takes its shape from here.
    """
    L, d, inter = config.n_layers, config.d_model, config.intermediate_size
    heads = config.n_kv_heads if tables else config.n_heads
    shapes: dict[str, tuple[int, ...]] = {"head": (L, heads), "intermediate": (L, inter)}
    vectors = {"head_layer": L, "mlp": L, "hidden": d, "layer": L}
    shapes.update({name: (1, size) if tables else (size,) for name, size in vectors.items()})
    return {name: shapes[name] for name in MASK_NAMES}


@dataclass(frozen=True)
class _Mask:
    """One mask type: its table is [rows, size]; `keep` entries per row survive at the target."""

    rows: int
    size: int
    keep: int

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.keep / self.size


class L0Module(nn.Module):
    """Learned structural masks over a LLaMA and the Lagrangian that pulls them to a target shape.

    Passed to ``ComposerLlama(config, mask_source=L0Module(...))``, its ``forward()`` returns the masks
    the model applies: sampled hard-concrete gates in training, deterministic masks in eval. Heads are
    gated per key/value group (a KV head with its query heads), so a pruned GQA model stays a valid
    GQA model; MHA is the case of one query head per group. The training step comes from
    ``PruningCallback`` (attribute ``step``); the module never reads the trainer.

    Under FSDP2 Composer shards this module like any other child of the model (its parameters become
    DTensors, whole only while FSDP's hooks have gathered them). So everything that reads the
    parameters with gradients goes through a call: ``forward()`` for the masks, ``forward(lagrangian=True)``
    for the penalty; FSDP then reduce-scatters (averages) their gradients like the model's. Reading
    them without gradients (metrics) happens inside :meth:`gathered`. The Lagrange multipliers are
    1-element vectors, not scalars: FSDP2 shards along dim 0 and refuses 0-dim parameters.

    Args:
        source (LlamaConfig): the model being pruned.
        target_model (dict): the target shape, keys among ``TARGET_KEYS``; missing keys keep the source's.
        pruning_modules (Sequence[str]): which masks to learn, among ``PRUNING_MODULES``. Checked against
            the target: each dimension that shrinks needs its module.
        lagrangian_warmup_steps (int | str): batches over which target sparsities rise linearly from
            ``start_sparsity`` to the target. Default: 0 (the full target from the first batch).
        start_sparsity (float): target sparsity at step 0. Default: 0.0.
        eval_target_model (bool): evaluate with exactly the target shape instead of the current
            deterministic one. Default: ``False``.
        seed (int): seeds the gate noise, which is a pure function of ``(seed, step)``: every
            micro-batch of a step, on every rank, applies the same gates, so a step's gradient does not
            depend on the number of ranks or on the micro-batch size, and a resumed run draws the same
            gates without any generator state. Default: ``0``.

    Example:
        >>> source = LlamaConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4, intermediate_size=128)
        >>> l0 = L0Module(source, {"n_heads": 2, "n_layers": 3}, ["head", "layer"])
        >>> model = ComposerLlama(source, mask_source=l0)  # doctest: +SKIP
    """

    def __init__(
        self,
        source: LlamaConfig,
        target_model: Mapping[str, int],
        pruning_modules: Sequence[str],
        lagrangian_warmup_steps: int | str = 0,
        start_sparsity: float = 0.0,
        eval_target_model: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.source = source
        self.target = self._target_config(source, dict(target_model))
        self.pruning_modules = tuple(pruning_modules)
        self._check_modules()
        self.warmup_steps = parse_steps(lagrangian_warmup_steps, "model.l0_module.lagrangian_warmup_steps")
        if not 0.0 <= start_sparsity < 1.0:
            raise ValueError(f"model.l0_module.start_sparsity: must be in [0, 1), got {start_sparsity}")
        self.start_sparsity = start_sparsity
        self.eval_target_model = eval_target_model
        self.seed = seed
        self.step = 0  # set by PruningCallback at every batch start (set_step)
        self.group = source.n_heads // source.n_kv_heads
        self.masks = {name: self._mask_spec(name) for name in self.pruning_modules}
        self.z_loga = nn.ParameterDict(
            {name: nn.Parameter(torch.empty(spec.rows, spec.size)) for name, spec in self.masks.items()}
        )
        self.lambda_1 = nn.ParameterDict({name: nn.Parameter(torch.zeros(1)) for name in self.masks})
        self.lambda_2 = nn.ParameterDict({name: nn.Parameter(torch.zeros(1)) for name in self.masks})
        self.reset_parameters()

    @classmethod
    def from_dict(cls, source: LlamaConfig, values: Mapping[str, Any]) -> "L0Module":
        """Builds from a yaml's ``model.l0_module`` section, naming any key that is not an argument."""
        allowed = ("target_model", "pruning_modules", "lagrangian_warmup_steps", "start_sparsity",
                   "eval_target_model", "seed")
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"model.l0_module: unknown key(s) {unknown}; allowed: {list(allowed)}")
        for key in ("target_model", "pruning_modules"):
            if key not in values:
                raise ValueError(f"model.l0_module.{key}: required")
        return cls(source, **values)

    # ---- configuration -------------------------------------------------------------------------

    @staticmethod
    def _target_config(source: LlamaConfig, target: dict[str, Any]) -> LlamaConfig:
        unknown = sorted(set(target) - set(TARGET_KEYS))
        if unknown:
            raise ValueError(f"model.l0_module.target_model: unknown key(s) {unknown}; allowed: {list(TARGET_KEYS)}")
        group = source.n_heads // source.n_kv_heads
        if "n_heads" in target and "n_kv_heads" not in target:
            if target["n_heads"] % group:
                raise ValueError(
                    f"model.l0_module.target_model.n_heads: {target['n_heads']} is not a multiple of the "
                    f"source's {group} query heads per key/value head (whole KV groups are pruned)"
                )
            target["n_kv_heads"] = target["n_heads"] // group
        if "n_kv_heads" in target and "n_heads" not in target:
            target["n_heads"] = target["n_kv_heads"] * group
        if "n_heads" in target and target["n_heads"] != target["n_kv_heads"] * group:
            raise ValueError(
                f"model.l0_module.target_model: n_heads {target['n_heads']} / n_kv_heads {target['n_kv_heads']} "
                f"must keep the source's {group} query heads per key/value head"
            )
        for key in TARGET_KEYS:
            value = target.setdefault(key, getattr(source, key))
            if not isinstance(value, int) or not 0 < value <= getattr(source, key):
                raise ValueError(
                    f"model.l0_module.target_model.{key}: {value!r} must be an int in 1..{getattr(source, key)} "
                    "(the source's size)"
                )
        return LlamaConfig.from_dict({**source.to_dict(), **target, "head_dim": source.head_dim})

    def _check_modules(self) -> None:
        unknown = sorted(set(self.pruning_modules) - set(PRUNING_MODULES))
        if unknown or not self.pruning_modules:
            raise ValueError(
                f"model.l0_module.pruning_modules: {list(self.pruning_modules)}; choose from {list(PRUNING_MODULES)}"
            )
        needs = {"d_model": "hidden", "n_kv_heads": "head", "n_layers": "layer", "intermediate_size": "intermediate"}
        for key, module in needs.items():
            if getattr(self.target, key) < getattr(self.source, key) and module not in self.pruning_modules:
                raise ValueError(
                    f"model.l0_module.pruning_modules: target_model.{key} {getattr(self.target, key)} is smaller "
                    f"than the source's {getattr(self.source, key)}, which needs '{module}' in pruning_modules"
                )

    def _mask_spec(self, name: str) -> _Mask:
        rows, size = mask_shapes(self.source, tables=True)[name]
        t = self.target
        kept = {"head": t.n_kv_heads, "intermediate": t.intermediate_size, "hidden": t.d_model, "layer": t.n_layers}
        # head_layer / mlp: the target keeps every sublayer; these gates only add freedom in training.
        return _Mask(rows, size, kept.get(name, size))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints written before the multipliers became 1-element vectors hold them as scalars.
        for key in [k for k in state_dict if k.startswith((f"{prefix}lambda_1.", f"{prefix}lambda_2."))]:
            if state_dict[key].dim() == 0:
                state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for z in self.z_loga.values():
                z.normal_(LOGA_INIT_MEAN, LOGA_INIT_STD)
            for lam in (*self.lambda_1.values(), *self.lambda_2.values()):
                lam.zero_()

    # ---- the mathematics ---------------------------------------------------------------------

    def score(self, name: str) -> torch.Tensor:
        """Probability that each gate is non-zero: 1 - Q(z <= 0), shape [rows, size]."""
        return torch.sigmoid(self.z_loga[name] - BETA * math.log(-LIMIT_A / LIMIT_B))

    def set_step(self, step: int) -> None:
        """The training step the next forwards belong to (their gates and target sparsities)."""
        self.step = step

    def sample(self, name: str, generator: torch.Generator | None = None) -> torch.Tensor:
        """One reparameterised hard-concrete draw per gate, in [0, 1], differentiable in log-alpha."""
        z_loga = self.z_loga[name]
        u = torch.rand(z_loga.shape, generator=generator, device=z_loga.device, dtype=z_loga.dtype)
        u = u.clamp(EPS, 1 - EPS)
        s = torch.sigmoid((u.log() - (1 - u).log() + z_loga) / BETA)
        return (s * (LIMIT_B - LIMIT_A) + LIMIT_A).clamp(0.0, 1.0)

    def expected_sparsity(self, name: str) -> torch.Tensor:
        """Expected fraction of gates that are zero, per row: [rows]."""
        return 1.0 - self.score(name).mean(dim=-1)

    def target_sparsity(self, name: str, step: int | None = None) -> float:
        """The warmed-up target at ``step`` (default: the current step)."""
        step = self.step if step is None else step
        final = self.masks[name].target_sparsity
        if self.warmup_steps == 0 or step >= self.warmup_steps:
            return final
        return self.start_sparsity + (final - self.start_sparsity) * step / self.warmup_steps

    def lagrangian(self) -> torch.Tensor:
        """sum over masks of mean over rows of lambda_1 (s - t) + lambda_2 (s - t)^2.

        In training, ask for it through ``forward(lagrangian=True)`` (sharded parameters are whole there).
        """
        total = self.z_loga[self.pruning_modules[0]].new_zeros(())
        for name in self.masks:
            gap = self.expected_sparsity(name) - self.target_sparsity(name)  # (rows,)
            total = total + (self.lambda_1[name] * gap + self.lambda_2[name] * gap.pow(2)).mean()  # lambdas: (1,)
        return total

    def _scores_or_ones(self) -> dict[str, torch.Tensor]:
        ref = self.z_loga[self.pruning_modules[0]]
        return {name: self.score(name) if name in self.masks else ref.new_ones(shape)
                for name, shape in mask_shapes(self.source, tables=True).items()}

    def expected_params(self) -> torch.Tensor:
        """Expected non-embedding matmul parameters under the current gate probabilities."""
        p = self._scores_or_ones()
        s = self.source
        hidden = p["hidden"].sum()
        layer = p["layer"][0]  # (L,)
        attn_per_group = s.head_dim * (2 * self.group + 2)  # q and o for the group's queries, k and v
        attn = (p["head"].sum(-1) * p["head_layer"][0] * layer).sum() * attn_per_group
        mlp = (p["intermediate"].sum(-1) * p["mlp"][0] * layer).sum() * 3
        return hidden * (attn + mlp)

    @staticmethod
    def non_embedding_params(config: LlamaConfig) -> int:
        """Matmul parameters of the decoder layers (what ``expected_params`` estimates)."""
        attn = config.d_model * config.head_dim * (2 * config.n_heads + 2 * config.n_kv_heads)
        return config.n_layers * (attn + 3 * config.d_model * config.intermediate_size)

    # ---- masks handed to the model -----------------------------------------------------------

    def deterministic(self, name: str, exact_target: bool) -> torch.Tensor:
        """Per row, the ``keep`` largest gates keep their soft value, the rest are zero.

        ``keep`` is the target count (``exact_target``) or the expected count of open gates, rounded.
        """
        z_loga = self.z_loga[name].detach()
        spec = self.masks[name]
        keep = spec.keep if exact_target else self.current_keep(name)
        soft = torch.sigmoid(z_loga / BETA * 0.8)  # (rows, size)
        mask = torch.zeros_like(soft)
        if keep > 0:
            top = z_loga.topk(keep, dim=-1).indices  # (rows, keep)
            mask.scatter_(-1, top, soft.gather(-1, top))
        return mask

    def current_keep(self, name: str) -> int:
        return int(torch.round(self.score(name).detach().sum(-1).mean()).item())

    def current_shape(self) -> dict[str, int]:
        """The shape the current deterministic masks would prune to."""
        shape = {key: getattr(self.source, key) for key in TARGET_KEYS}
        kept = {name: self.current_keep(name) for name in self.masks}
        if "hidden" in kept:
            shape["d_model"] = kept["hidden"]
        if "head" in kept:
            shape["n_kv_heads"], shape["n_heads"] = kept["head"], kept["head"] * self.group
        if "layer" in kept:
            shape["n_layers"] = kept["layer"]
        if "intermediate" in kept:
            shape["intermediate_size"] = kept["intermediate"]
        return shape

    def model_masks(self, tables: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mask tables -> the shapes ComposerLlama takes (head per query head, vectors unrolled)."""
        masks = {}
        for name, table in tables.items():
            if name == "head":
                masks[name] = table.repeat_interleave(self.group, dim=-1)  # (L, H): a group shares its gate
            elif name in ("hidden", "layer", "head_layer", "mlp"):
                masks[name] = table[0]
            else:
                masks[name] = table
        return masks

    def deterministic_masks(self, exact_target: bool = True) -> dict[str, torch.Tensor]:
        """The masks pruning uses (``exact_target``) or the current ones, in the model's shapes."""
        return self.model_masks({name: self.deterministic(name, exact_target) for name in self.masks})

    def forward(self, lagrangian: bool = False) -> dict[str, torch.Tensor] | torch.Tensor:
        """The masks for the model, or with ``lagrangian=True`` the penalty to add to the loss."""
        if lagrangian:
            return self.lagrangian()
        if self.training:
            # One draw per (seed, step), whatever the rank or micro-batch; the global RNG is left alone.
            device = self.z_loga[self.pruning_modules[0]].device
            generator = torch.Generator(device=device).manual_seed(((self.seed << 32) + self.step) % 2**63)
            return self.model_masks({name: self.sample(name, generator) for name in self.masks})
        return self.deterministic_masks(exact_target=self.eval_target_model)

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """Whole parameters for reading outside a forward (metrics, logging); a no-op without FSDP.

        Under FSDP2 this all-gathers them: a collective, so every rank must enter it at the same point.
        """
        if not isinstance(self, FSDPModule):
            yield
            return
        self.unshard()
        try:
            yield
        finally:
            self.reshard()

    @torch.no_grad()
    def constrain_parameters(self) -> None:
        """Clamps log-alphas into their bounds (after each optimizer step); elementwise, so under FSDP2
        each rank clamps its own shard."""
        for z in self.z_loga.values():
            z.clamp_(LOGA_MIN, LOGA_MAX)


def pruning_param_groups(model: nn.Module, lag_lr: float) -> list[dict[str, Any]]:
    """The optimizer groups Sheared-LLaMA trains with, for any torch or Composer optimizer.

    Model weights go in the first group, at the optimizer's ``lr`` and on its schedule; the mask
    log-alphas at ``lag_lr`` and the Lagrange multipliers at ``-lag_lr`` (gradient ascent: they grow
    while the expected sparsity misses its target), both without weight decay and held at that rate
    (``HELD_LR_KEY``) whatever the schedule does. ``PruningCallback`` refuses an optimizer built
    otherwise. Under FSDP2 Composer swaps each parameter for its sharded DTensor by name and keeps
    every other key of its group, so the groups and their rates survive sharding.

    Args:
        model (nn.Module): a model whose ``mask_source`` is an :class:`L0Module` (``ComposerLlama``).
        lag_lr (float): the masks' learning rate, positive (Sheared-LLaMA uses 1.0).

    Example:
        >>> model = ComposerLlama(config, mask_source=L0Module(config, {"n_layers": 3}, ["layer"]))
        >>> optimizer = DecoupledAdamW(pruning_param_groups(model, lag_lr=1.0), lr=3e-3)  # doctest: +SKIP
    """
    l0 = getattr(model, "mask_source", None)
    if not isinstance(l0, L0Module):
        raise ValueError(f"pruning_param_groups: {type(model).__name__} has no L0Module as mask_source; "
                         "build it as ComposerLlama(config, mask_source=L0Module(...))")
    if isinstance(lag_lr, bool) or not isinstance(lag_lr, (int, float)) or not lag_lr > 0:
        raise ValueError(f"lag_lr: must be a positive number (the masks' learning rate, e.g. 1.0), got {lag_lr!r}")
    own = {id(p) for p in l0.parameters()}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    lambdas = [*l0.lambda_1.values(), *l0.lambda_2.values()]
    return [
        {"params": weights},
        {"params": list(l0.z_loga.values()), "lr": lag_lr, HELD_LR_KEY: lag_lr, "weight_decay": 0.0},
        {"params": lambdas, "lr": -lag_lr, HELD_LR_KEY: -lag_lr, "weight_decay": 0.0},
    ]
