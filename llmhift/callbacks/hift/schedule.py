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
    head and any other embedding table, each with the largest module around it that holds no block:
    BERT's embeddings with their LayerNorm, ``peft``'s virtual-token encoder with its MLP), each block
    of the model's largest ``nn.ModuleList``, the final norm (modules whose class names a ``Norm``), and
    the head: everything else after the blocks (an LM head, an encoder's pooler and classifier). Only
    parameters that require grad count, so a ``peft`` model cycles over its adapters; empty units are
    dropped."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks; HiFT cannot find its layers")
    blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    unit_of = {id(p): f"block.{i}" for i, block in enumerate(blocks) for p in block.parameters()}
    parent = {id(child): module for module in model.modules() for child in module.children()}
    around, holds_blocks = blocks, {id(blocks)}  # the blocks' list and every module around it
    while id(around) in parent:
        around = parent[id(around)]
        holds_blocks.add(id(around))
    for table in (m for m in model.modules() if isinstance(m, nn.Embedding)):
        while id(table) in parent and id(parent[id(table)]) not in holds_blocks:
            table = parent[id(table)]
        for p in table.parameters():
            unit_of.setdefault(id(p), "embedding")
    for module in model.modules():
        for p in module.parameters(recurse=False):
            unit_of.setdefault(id(p), "norm" if "Norm" in type(module).__name__ else "head")
    order = ["embedding", *(f"block.{i}" for i in range(len(blocks))), "norm", "head"]
    members: dict[str, list[str]] = {name: [] for name in order}
    for name, p in model.named_parameters():  # a tied head appears once, under the embedding
        if p.requires_grad:
            members[unit_of[id(p)]].append(name)
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
    if len(units) == 1:
        name, params = units[0]
        raise ValueError(f"the model has one trainable unit ({name!r}: {params[0]}, ...), so HiFT has nothing to "
                         "cycle (a prompt, prefix or P-tuning model trains one virtual-token table); drop "
                         "callbacks.hift and train it whole")
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
