"""Multi-task instruction data (MFTCoder's layout): which conversation belongs to which task, rows that
carry their task as ``domain_idx``, and the train stream that mixes tasks by changeable proportions.

A task is the instruction-tuning counterpart of a pretraining domain, so it travels in the same batch
key (``domain_idx``, the task's position in the task list): the per-domain metrics
(``<task>_LanguageCrossEntropy``), the dynamic loading callback and the task-balanced loss all read it.

Tasks are given in one of three ways (``dataset.tasks`` / ``dataset.task_names``):

* a list of folders, MFTCoder's way: each folder's last path component names the task, and it holds
  ``<split>.jsonl`` or a ``<split>/`` folder of 1+ ``*.jsonl`` files;
* a mapping ``{task: folder or jsonl file}`` (a file is read whatever the split);
* ``task_names`` with one ``<local>/<split>.jsonl`` whose lines each carry ``"data_name": <task>``.

Relative folders are taken inside ``local``. A line whose ``data_name`` is missing (third way) or names
another task is refused with its file and line.

Rows are packed within a task: a row never mixes tasks, so its loss and metrics belong to one task.
``packing: mixed`` packs across tasks in file order (fewer pad tokens, a shorter epoch); the row then
counts as the task of its first conversation, so per-task losses and balancing blur by that much.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from llmhift.datasets.demo_tasks import build_demo_tasks
from llmhift.datasets.dynamic_streaming import DynamicMixDataset
from llmhift.datasets.instruction import (
    PACKING_MIXED,
    TASK_FIELD,
    Row,
    check_instruction_dataset,
    check_tokenizer,
    compact,
    encode_at,
    make_rows,
    padded_sample,
    read_tagged_conversations,
    resolve_template,
)

__all__ = [
    "MultiTaskInstructionDataset",
    "TaskFile",
    "TaskMixDataset",
    "check_task_dataset",
    "has_tasks",
    "read_task_conversations",
    "resolve_tasks",
]

TaskFile = tuple[Path, "int | None"]  # a jsonl file and its task index, None: each line's data_name says


def _split_files(folder: Path, split: str, task: str) -> list[Path]:
    if (folder / f"{split}.jsonl").is_file():
        return [folder / f"{split}.jsonl"]
    files = sorted((folder / split).glob("*.jsonl")) if (folder / split).is_dir() else []
    if not files:
        raise ValueError(f"tasks: task {task!r}: {folder} holds neither {split}.jsonl nor {split}/*.jsonl")
    return files


def resolve_tasks(
    tasks: Sequence[str] | Mapping[str, str] | None, task_names: Sequence[str] | None, local: str | Path, split: str
) -> tuple[list[str], list[TaskFile]]:
    """The task names (metric order) and the jsonl files to read, each with its task index; a ValueError
    starting with ``tasks:`` or ``task_names:`` otherwise."""
    root = Path(local)
    if (tasks is None) == (task_names is None):
        raise ValueError("tasks: give either tasks (folders, or a {task: folder or jsonl} mapping) or task_names "
                         f"(tasks named by each line's {TASK_FIELD!r} in local/<split>.jsonl), not both or neither")
    if task_names is not None:
        names = [str(n) for n in task_names]
        path = root / f"{split}.jsonl"
        if not path.is_file():
            raise ValueError(f"task_names: {path} does not exist (its lines name their task in {TASK_FIELD!r})")
        files: list[TaskFile] = [(path, None)]
    elif isinstance(tasks, Mapping):
        names, files = [str(n) for n in tasks], []
        for i, (name, where) in enumerate(tasks.items()):
            target = root / str(where)  # an absolute path stays as it is
            if target.is_file():
                files.append((target, i))
            elif target.is_dir():
                files.extend((f, i) for f in _split_files(target, split, str(name)))
            else:
                raise ValueError(f"tasks.{name}: {target} is neither a jsonl file nor a folder")
    else:
        folders = [root / str(t) for t in tasks]
        names, files = [f.name for f in folders], []
        for i, folder in enumerate(folders):
            if not folder.is_dir():
                raise ValueError(f"tasks: {folder} is not a folder (a task folder holds {split}.jsonl or {split}/)")
            files.extend((f, i) for f in _split_files(folder, split, folder.name))
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated or not names:
        raise ValueError(f"tasks: need unique task names (each is a metric key), got {names}")
    return names, files


def read_task_conversations(names: list[str], files: list[TaskFile]):
    """``(path:line, rounds, task index)`` of every conversation; a ValueError names the line whose
    ``data_name`` is missing where it decides, or names a task other than its own or an unknown one."""
    for path, task in files:
        try:
            yield from _tagged(path, task, names)
        except ValueError as err:
            message = str(err)
            raise ValueError(message if message.startswith("task") else f"tasks: {message}") from None


def _tagged(path: Path, task: int | None, names: list[str]):
    for where, rounds, name in read_tagged_conversations(path):
        if task is None:
            if name is None:
                raise ValueError(f"task_names: {where}: no {TASK_FIELD!r} field; give every line its task "
                                 f"(one of {names})")
            if name not in names:
                raise ValueError(f"task_names: {where}: {TASK_FIELD} {name!r} is not a known task {names}; "
                                 "add it to task_names or fix the line")
            yield where, rounds, names.index(name)
        else:
            if name is not None and name != names[task]:
                raise ValueError(f"tasks: {where}: {TASK_FIELD} {name!r} but the line is in task "
                                 f"{names[task]!r}'s data; move the line or fix its {TASK_FIELD}")
            yield where, rounds, task


def has_tasks(dataset: Any) -> bool:
    """Whether a loader's ``dataset`` section names tasks (the multi-task instruction loader)."""
    return getattr(dataset, "tasks", None) is not None or getattr(dataset, "task_names", None) is not None


def check_task_dataset(dataset: Any, build_demo: bool = False) -> list[str]:
    """Checks a multi-task ``dataset`` section and every line of its task files (as
    :func:`~llmhift.datasets.instruction.check_instruction_dataset` does for one file); returns the
    task names. Builds the demo tasks into ``local`` when asked and missing."""
    if build_demo and dataset.tasks is not None and not Path(dataset.local).exists():
        build_demo_tasks(dataset.local)
    if dataset.packing not in (True, False, PACKING_MIXED):
        raise ValueError(f"packing: {dataset.packing!r} is not true, false or {PACKING_MIXED!r}")
    names, files = resolve_tasks(dataset.tasks, dataset.task_names, dataset.local, dataset.split)
    seen: set[int] = set()

    def conversations():
        for where, rounds, task in read_task_conversations(names, files):
            seen.add(task)
            yield where, rounds

    check_instruction_dataset(dataset, conversations=conversations())
    empty = [name for i, name in enumerate(names) if i not in seen]
    if empty:
        raise ValueError(f"tasks: task(s) {empty} have no conversation in split {dataset.split!r}")
    return names


class MultiTaskInstructionDataset(Dataset):
    """Tokenized rows of several tasks, each row ``{input_ids, labels, attention_mask, domain_idx}``.

    Args:
        local (str | Path): the folder relative task paths are taken in (and ``task_names``' jsonl).
        split (str): ``train``, ``eval``, ...
        tokenizer (PreTrainedTokenizerBase), max_seq_len (int), chat_template: as for
            :class:`~llmhift.datasets.instruction.InstructionDataset`.
        tasks (Sequence[str] | Mapping[str, str], optional): task folders or ``{task: folder or jsonl}``.
        task_names (Sequence[str], optional): instead of ``tasks``: names that lines give in ``data_name``.
        packing (bool | str): ``True`` packs within each task; ``"mixed"`` across tasks. Default: ``False``.
    """

    def __init__(
        self,
        local: str | Path,
        split: str,
        tokenizer: PreTrainedTokenizerBase,
        max_seq_len: int,
        chat_template: Mapping[str, str] | str | None = None,
        tasks: Sequence[str] | Mapping[str, str] | None = None,
        task_names: Sequence[str] | None = None,
        packing: bool | str = False,
    ) -> None:
        template = resolve_template(chat_template)
        check_tokenizer(tokenizer, template)
        if packing not in (True, False, PACKING_MIXED):
            raise ValueError(f"packing: {packing!r} is not true, false or {PACKING_MIXED!r}")
        self.tasks, files = resolve_tasks(tasks, task_names, local, split)
        self.max_seq_len = max_seq_len
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        in_order: list[tuple[Row, int]] = []
        for where, rounds, task in read_task_conversations(self.tasks, files):
            ids, labels = encode_at(where, rounds, tokenizer, template)
            in_order.append(((ids[:max_seq_len], labels[:max_seq_len]), task))
        self.rows: list[tuple[np.ndarray, np.ndarray]] = []  # compact rows
        self.row_tasks: list[int] = []
        # mixed: one sequence in file order; otherwise each task's own, so that no row mixes tasks
        groups = [in_order] if packing == PACKING_MIXED else [
            [(c, t) for c, t in in_order if t == task] for task in range(len(self.tasks))
        ]
        for group in groups:
            for row, first in make_rows([c for c, _ in group], max_seq_len, bool(packing)):
                self.rows.append(compact(row))
                self.row_tasks.append(group[first][1])
        empty = [name for i, name in enumerate(self.tasks) if i not in set(self.row_tasks)]
        if empty and packing != PACKING_MIXED:  # mixed: a task may only ever continue other tasks' rows
            raise ValueError(f"tasks: task(s) {empty} keep no response token within max_seq_len={max_seq_len} "
                             f"in split {split!r}; give them data or drop them")

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        """Row ``i`` without its task."""
        return padded_sample(*self.rows[i], self.max_seq_len, self.pad_id)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**self.sample(i), "domain_idx": torch.tensor(self.row_tasks[i])}


class TaskMixDataset(DynamicMixDataset):
    """The train stream of a :class:`MultiTaskInstructionDataset`: tasks drawn by proportions that
    :class:`~llmhift.callbacks.dynamic_loading.DynamicLoadingCallback` may change, with the sampler of
    :class:`~llmhift.datasets.dynamic_streaming.DynamicMixDataset` (deterministic across workers and
    ranks, resumable from its ``state_dict``; endless, so durations are in batches).

    Args:
        source (MultiTaskInstructionDataset): the rows; ``domains`` are its tasks.
        batch_size (int), proportion, seed, lookahead_batches, rank, world_size: as for
            :class:`~llmhift.datasets.dynamic_streaming.DynamicMixDataset`. Default proportion: the
            tasks' shares of rows.
    """

    def __init__(self, source: MultiTaskInstructionDataset, batch_size: int, **kwargs: Any) -> None:
        self.source = source
        self._rows = [[row for row, t in zip(source.rows, source.row_tasks) if t == task]
                      for task in range(len(source.tasks))]  # each task's rows (shared arrays, not copies)
        super().__init__(source.tasks, [len(rows) for rows in self._rows], batch_size, **kwargs)

    def _load(self, d: int, sample_id: int) -> dict[str, torch.Tensor]:
        return padded_sample(*self._rows[d][sample_id], self.source.max_seq_len, self.source.pad_id)
