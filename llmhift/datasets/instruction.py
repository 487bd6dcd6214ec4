"""Instruction-tuning data: jsonl prompts/responses or chat rounds -> samples where only responses carry loss.

Each line of ``<folder>/<split>.jsonl`` is either::

    {"prompt": "...", "response": "..."}
    {"chat_rounds": [{"role": "system", "content": "..."}, {"role": "human", "content": "..."},
                     {"role": "bot", "content": "..."}, ...]}        # MFTCoder's roles

A chat template gives each role's text around ``{content}``; the bot's text before ``{content}`` is
prompt, the content, the rest of the bot template and the EOS token are response. Pieces are
tokenized one by one and concatenated, so the boundary between prompt and response is exact.
A sample is ``{input_ids, labels, attention_mask}`` of ``max_seq_len`` tokens, padded on the right:
``labels`` equal ``input_ids`` on response tokens and are -100 elsewhere (the model shifts them).
With ``packing`` several conversations share one row (they then attend to each other, as in any
packing without a block-diagonal mask); a conversation longer than a row is cut at its end.

``build_demo_instructions(folder)`` writes a small offline set made from the running Python's
standard library: "What does `json.dumps` do?" -> the first sentence of its docstring, plus
multi-turn arithmetic chats.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from llmhift.models.causal_lm import IGNORE_INDEX
from llmhift.utils.atomic import atomic_directory

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "InstructionDataset",
    "build_demo_instructions",
    "check_instruction_dataset",
    "encode_conversation",
]

ROLES = ("system", "human", "bot")
DEFAULT_CHAT_TEMPLATE = {
    "system": "<|system|>\n{content}\n",
    "human": "<|user|>\n{content}\n",
    "bot": "<|assistant|>\n{content}\n",
}


def _rounds(row: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    if "chat_rounds" in row:
        rounds = row["chat_rounds"]
    elif "prompt" in row and "response" in row:
        rounds = [{"role": "human", "content": row["prompt"]}, {"role": "bot", "content": row["response"]}]
    else:
        raise ValueError(f"{where}: expected keys prompt+response or chat_rounds, got {sorted(row)}")
    for turn in rounds:
        if turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ValueError(f"{where}: every round needs a role in {ROLES} and a string content, got {turn}")
    if not any(turn["role"] == "bot" for turn in rounds):
        raise ValueError(f"{where}: no bot round, so nothing to learn")
    return rounds


def encode_conversation(
    rounds: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, template: Mapping[str, str]
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its labels (-100 outside bot responses)."""
    ids: list[int] = []
    labels: list[int] = []

    def add(text: str, learn: bool) -> None:
        if text:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids.extend(piece)
            labels.extend(piece if learn else [IGNORE_INDEX] * len(piece))

    for turn in rounds:
        before, after = template[turn["role"]].split("{content}")
        learn = turn["role"] == "bot"
        add(before, False)
        add(turn["content"], learn)
        add(after, learn)
        if learn:
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
    return ids, labels


class InstructionDataset(Dataset):
    """Tokenized instruction samples from ``<folder>/<split>.jsonl``, all ``max_seq_len`` long.

    Args:
        folder (str | Path): holds ``<split>.jsonl``.
        split (str): ``train``, ``eval``, ...
        tokenizer (PreTrainedTokenizerBase): needs an EOS token; padding uses its pad token (or EOS).
        max_seq_len (int): tokens per sample.
        chat_template (Mapping[str, str], optional): role -> text with one ``{content}``.
            Default: :data:`DEFAULT_CHAT_TEMPLATE`.
        packing (bool): fill rows with several conversations. Default: ``False``.
    """

    def __init__(
        self,
        folder: str | Path,
        split: str,
        tokenizer: PreTrainedTokenizerBase,
        max_seq_len: int,
        chat_template: Optional[Mapping[str, str]] = None,
        packing: bool = False,
    ) -> None:
        template = dict(chat_template or DEFAULT_CHAT_TEMPLATE)
        bad = [r for r in ROLES if template.get(r, "").count("{content}") != 1]
        if bad:
            raise ValueError(f"chat_template: roles {bad} need a text with exactly one {{content}} each")
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: has no EOS token; responses must end with one")
        path = Path(folder) / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.max_seq_len = max_seq_len
        conversations = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    rounds = _rounds(json.loads(line), f"{path}:{line_no}")
                    ids, labels = encode_conversation(rounds, tokenizer, template)
                    conversations.append((ids[:max_seq_len], labels[:max_seq_len]))
        # A conversation whose responses were all cut off teaches nothing; its loss would be 0/0.
        self.rows = [c for c in (self._pack(conversations) if packing else conversations)
                     if any(t != IGNORE_INDEX for t in c[1])]
        if not self.rows:
            raise ValueError(f"{path}: no sample keeps a response token within max_seq_len={max_seq_len}")

    def _pack(self, conversations: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
        rows: list[tuple[list[int], list[int]]] = []
        for ids, labels in conversations:  # in file order: a new row when the next one does not fit
            if rows and len(rows[-1][0]) + len(ids) <= self.max_seq_len:
                rows[-1][0].extend(ids)
                rows[-1][1].extend(labels)
            else:
                rows.append((list(ids), list(labels)))
        return rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels = self.rows[i]
        pad = self.max_seq_len - len(ids)
        return {
            "input_ids": torch.tensor(ids + [self.pad_id] * pad),  # (T,)
            "labels": torch.tensor(labels + [IGNORE_INDEX] * pad),  # (T,)
            "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),  # (T,)
        }


def check_instruction_dataset(dataset: Any, build_demo: bool = False) -> None:
    """Checks a loader's ``dataset`` section (``local``, ``split``, ``tokenizer``, ``max_seq_len``,
    ``chat_template``); builds the demo set into ``local`` when asked and missing. Errors start with
    the offending field's name."""
    path = Path(dataset.local) / f"{dataset.split}.jsonl"
    if build_demo and not path.is_file():
        build_demo_instructions(dataset.local)
    if not path.is_file():
        raise ValueError(f"local: {path} does not exist (an instruction folder holds <split>.jsonl)")
    if dataset.max_seq_len is None or dataset.max_seq_len < 2:
        raise ValueError(f"max_seq_len: the instruction loader needs a row length of at least 2, got {dataset.max_seq_len}")
    folder = Path(dataset.tokenizer or "")
    if dataset.tokenizer is None or not (folder / "tokenizer_config.json").is_file():
        raise ValueError(f"tokenizer: {dataset.tokenizer!r} is not a local tokenizer folder (llmhift never downloads)")
    template = dict(dataset.chat_template or DEFAULT_CHAT_TEMPLATE)
    bad = [r for r in ROLES if template.get(r, "").count("{content}") != 1]
    if bad:
        raise ValueError(f"chat_template: roles {bad} need a text with exactly one {{content}} each")


_DEMO_MODULES = ("json", "os.path", "re", "string", "textwrap", "shutil", "random", "math", "itertools",
                 "functools", "collections", "statistics", "fractions", "heapq", "bisect", "base64",
                 "difflib", "fnmatch", "glob", "calendar", "copy", "csv", "html", "zlib", "gzip", "pathlib")


def _docstring_pairs() -> list[dict[str, str]]:
    pairs = []
    for module_name in _DEMO_MODULES:
        module = importlib.import_module(module_name)
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not callable(obj):
                continue
            doc = inspect.getdoc(obj) or ""
            sentence = re.split(r"(?<=\.)\s", " ".join(doc.split("\n\n")[0].split()), maxsplit=1)[0]
            if 20 <= len(sentence) <= 200:
                pairs.append({"prompt": f"What does `{module_name}.{name}` do?", "response": sentence})
    return pairs


def _arithmetic_chats(n: int, rng: random.Random) -> list[dict[str, Any]]:
    chats = []
    for _ in range(n):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        chats.append({"chat_rounds": [
            {"role": "system", "content": "You are a careful calculator."},
            {"role": "human", "content": f"What is {a} + {b}?"},
            {"role": "bot", "content": f"{a} + {b} = {a + b}."},
            {"role": "human", "content": f"And times {c}?"},
            {"role": "bot", "content": f"{a + b} * {c} = {(a + b) * c}."},
        ]})
    return chats


def build_demo_instructions(folder: str | Path, seed: int = 17) -> Path:
    """Writes ``train.jsonl`` and ``eval.jsonl`` into ``folder`` (atomically) unless both are there."""
    folder = Path(folder)
    if (folder / "train.jsonl").is_file() and (folder / "eval.jsonl").is_file():
        return folder
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = _docstring_pairs() + _arithmetic_chats(600, rng)
    rng.shuffle(rows)
    n_eval = max(len(rows) // 20, 1)
    try:
        with atomic_directory(folder) as tmp:
            for split, part in (("eval", rows[:n_eval]), ("train", rows[n_eval:])):
                with (tmp / f"{split}.jsonl").open("w", encoding="utf-8") as f:
                    f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in part)
    except FileExistsError:
        if not (folder / "train.jsonl").is_file():
            raise
    return folder
