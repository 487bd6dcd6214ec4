"""HiFT's units and schedule as pure functions of a model and the callback's settings: no State, no Trainer.

The callback, the yaml check before a model is loaded (``llmhift.build.trainer.check_hift``) and the
dry-run memory estimate (``llmhift.build.memory``) all plan from here, so they cannot disagree.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

__all__ = ["STRATEGIES", "Unit", "Plan", "find_units", "plan_groups", "cycle_of", "cycle_order", "group_at"]

STRATEGIES = ("down2up", "up2down", "random")
Unit = tuple[str, list[str]]  # (unit name, names of its trainable parameters)


def find_units(model: nn.Module) -> list[Unit]:
    """The model's units, bottom to top, as (unit name, names of its trainable parameters).

    Found from the module structure, not from parameter names: the input embedding (with a tied LM
    head and any other embedding table), each block of the model's largest ``nn.ModuleList``, the rest
    after the blocks (the final norm), and the LM head (a ``Linear`` with vocabulary outputs). Only
    parameters that require grad count, so a ``peft`` model cycles over its adapters; empty units are
    dropped."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks; HiFT cannot find its layers")
    blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    unit_of = {id(p): f"block.{i}" for i, block in enumerate(blocks) for p in block.parameters()}
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    vocab = embeddings[0].num_embeddings if embeddings else -1
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in unit_of:
                continue
            if isinstance(module, nn.Embedding):
                unit_of[id(p)] = "embedding"
            elif isinstance(module, nn.Linear) and module.out_features == vocab:
                unit_of[id(p)] = "head"
    order = ["embedding", *(f"block.{i}" for i in range(len(blocks))), "norm", "head"]
    members: dict[str, list[str]] = {name: [] for name in order}
    for name, p in model.named_parameters():  # a tied head appears once, under the embedding
        if p.requires_grad:
            members[unit_of.get(id(p), "norm")].append(name)
    return [(name, members[name]) for name in order if members[name]]


class Plan(NamedTuple):
    """Unit indices: never trained, trained at every step, and the groups one cycle visits (bottom to top)."""

    frozen: list[int]
    always: list[int]
    groups: list[list[int]]

    def trained_with(self, group: int) -> list[int]:
        """Unit indices trained while ``group`` is active: the group and the always-active units."""
        return self.groups[group] + self.always


def _indices(key: str, values: Sequence[int], units: Sequence[Unit]) -> list[int]:
    n = len(units)
    bad = [v for v in values if not -n <= v < n]
    if bad:
        raise ValueError(f"{key}: unit indices {bad} are out of range for {n} units {[u for u, _ in units]}")
    return sorted({v % n for v in values})


def plan_groups(units: Sequence[Unit], group_element: int, freeze_layers: Sequence[int] = (),
                always_active: Sequence[int] = ()) -> Plan:
    """The plan for these units, or a ValueError naming the key.

    A ``group_element`` above the number of cycled units asks for groups that cannot exist (it would
    silently become full fine-tuning), so it is refused rather than run."""
    frozen = _indices("freeze_layers", freeze_layers, units)
    always = _indices("always_active", always_active, units)
    if set(frozen) & set(always):
        raise ValueError(f"freeze_layers and always_active: both name units {sorted(set(frozen) & set(always))}")
    cycled = [u for u in range(len(units)) if u not in frozen and u not in always]
    if not cycled:
        raise ValueError(f"freeze_layers/always_active: leave no unit to cycle over among the {len(units)} units "
                         f"{[u for u, _ in units]}; free at least one")
    if group_element > len(cycled):
        raise ValueError(f"group_element: {group_element} is larger than the {len(cycled)} cycled units, "
                         f"which would train them all at once (full fine-tuning); use at most {len(cycled)}")
    groups = [cycled[i : i + group_element] for i in range(0, len(cycled), group_element)]
    return Plan(frozen, always, groups)


def cycle_order(n_groups: int, strategy: str, seed: int, cycle: int) -> list[int]:
    """Group indices in the order cycle ``cycle`` visits them: ``random`` draws a new permutation per
    cycle from ``seed + cycle``, so that a resumed run needs no generator state."""
    if strategy == "down2up":
        return list(range(n_groups))
    if strategy == "up2down":
        return list(range(n_groups - 1, -1, -1))
    if strategy == "random":
        return torch.randperm(n_groups, generator=torch.Generator().manual_seed(seed + cycle)).tolist()
    raise ValueError(f"strategy: {strategy!r} is not one of {STRATEGIES}")


def cycle_of(step: int, n_groups: int, switch_every: int = 1) -> int:
    """The cycle optimizer step ``step`` (0-based) belongs to: a cycle is ``switch_every`` steps per
    group, each of its ``n_groups`` groups in turn (``n_groups * switch_every`` steps)."""
    return step // (n_groups * switch_every)


def group_at(step: int, n_groups: int, strategy: str, seed: int, switch_every: int = 1) -> int:
    """The group trained at optimizer step ``step`` (0-based): every cycle visits each group once, for
    ``switch_every`` consecutive steps (BAdam's block schedule when above 1)."""
    cycle = cycle_of(step, n_groups, switch_every)
    return cycle_order(n_groups, strategy, seed, cycle)[(step - cycle * n_groups * switch_every) // switch_every]
