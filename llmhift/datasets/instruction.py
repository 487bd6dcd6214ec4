"""Instruction-tuning data: jsonl prompts/responses or chat rounds -> samples where only responses carry loss.

Each line of ``<folder>/<split>.jsonl`` is either::

    {"prompt": "...", "response": "..."}
    {"chat_rounds": [{"role": "system", "content": "..."}, {"role": "human", "content": "..."},
                     {"role": "bot", "content": "..."}, ...]}        # MFTCoder's roles

``messages`` may stand for ``chat_rounds`` and ``user`` / ``assistant`` for ``human`` / ``bot`` (the
Hugging Face spelling). Every bot turn is trained.

Two templates turn rounds into tokens:

* llmhift's own (the default): a mapping that gives each role's text around ``{content}``; the bot's
  text before ``{content}`` is prompt, the content, the rest of the bot template and the EOS token
  are response. Pieces are tokenized one by one and concatenated, so the boundary is exact.
* ``chat_template="tokenizer"``: the tokenizer's own ``chat_template`` (``apply_chat_template``), as
  an instruct model was trained with; see :func:`chat_template_segments` for how the boundary is found.
* ``chat_template="mftcoder"``: MFTCoder's training text, ``<s>human\n{input}<s>bot\n{target}{EOS}``
  per round after ``<s>system\n{system}`` (:data:`MFTCODER_ROLES`, llmhift's mechanism with its texts).

Several tasks (MFTCoder's ``data_name``, task folders) are read by :mod:`llmhift.datasets.instruction_tasks`.

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
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
from jinja2 import TemplateError
from torch.utils.data import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llmhift.atomic import atomic_directory
from llmhift.labels import IGNORE_INDEX

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "MFTCODER_TEMPLATE",
    "PACKING_MIXED",
    "TASK_FIELD",
    "TOKENIZER_TEMPLATE",
    "InstructionDataset",
    "arithmetic_chats",
    "build_demo_instructions",
    "chat_template_segments",
    "check_instruction_dataset",
    "check_tokenizer",
    "compact",
    "docstring_pairs",
    "encode_at",
    "encode_conversation",
    "make_rows",
    "padded_sample",
    "read_conversations",
    "read_tagged_conversations",
    "require_chat_template",
    "resolve_template",
]

ROLES = ("system", "human", "bot")
HF_ROLES = {"system": "system", "human": "user", "bot": "assistant"}  # the names chat templates expect
ROLE_ALIASES = {"user": "human", "assistant": "bot"}
TOKENIZER_TEMPLATE = "tokenizer"  # chat_template value that selects the tokenizer's own template
DEFAULT_CHAT_TEMPLATE = {
    "system": "<|system|>\n{content}\n",
    "human": "<|user|>\n{content}\n",
    "bot": "<|assistant|>\n{content}\n",
}
MFTCODER_TEMPLATE = "mftcoder"  # chat_template value that selects MFTCoder's format (MFTCODER_ROLES)
# MFTCoder's training text: ``<s>human\n{input}<s>bot\n{target}{EOS}`` per round, ``<s>system\n`` first;
# the literal ``<s>`` is text here (tokenized as such), the EOS is the tokenizer's, added after each target.
MFTCODER_ROLES = {"system": "<s>system\n{content}", "human": "<s>human\n{content}", "bot": "<s>bot\n{content}"}
TASK_FIELD = "data_name"  # MFTCoder's per-line task name
PACKING_MIXED = "mixed"  # packing value that lets one row hold several tasks' conversations
SHAPES = ('{"prompt": str, "response": str} or {"chat_rounds" (or "messages"): '
          '[{"role": system|human|bot (or user|assistant), "content": str}, ...]}')


def _rounds(row: Any, where: str) -> list[dict[str, str]]:
    """The row's turns with MFTCoder's role names; ValueError naming ``where``, the field and the shapes."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a line must be a JSON object, got {type(row).__name__}; write {SHAPES}")
    key = next((k for k in ("chat_rounds", "messages") if k in row), None)
    if key is None:
        missing = [k for k in ("prompt", "response") if k not in row]
        if len(missing) == 2:
            raise ValueError(f"{where}: no field 'prompt', 'response' or 'chat_rounds' (got {sorted(row)}); "
                             f"write {SHAPES}")
        if missing:
            raise ValueError(f"{where}: field {missing[0]!r} is missing; write {SHAPES}")
        if not all(isinstance(row[k], str) for k in ("prompt", "response")):
            raise ValueError(f"{where}: fields 'prompt' and 'response' must be strings; write {SHAPES}")
        return [{"role": "human", "content": row["prompt"]}, {"role": "bot", "content": row["response"]}]
    if not isinstance(row[key], list) or not row[key]:
        raise ValueError(f"{where}: field {key!r} must be a non-empty list of turns; write {SHAPES}")
    rounds = []
    for i, turn in enumerate(row[key]):
        field = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: field {field} must be an object with a role and a content; write {SHAPES}")
        for name in ("role", "content"):
            if not isinstance(turn.get(name), str):
                raise ValueError(f"{where}: field {field}.{name} is missing or not a string; write {SHAPES}")
        role = ROLE_ALIASES.get(turn["role"], turn["role"])
        if role not in ROLES:
            raise ValueError(f"{where}: {field}.role {turn['role']!r} is unknown; use one of "
                             f"{', '.join(ROLES)} (or {', '.join(ROLE_ALIASES)})")
        rounds.append({"role": role, "content": turn["content"]})
    if not any(turn["role"] == "bot" for turn in rounds):
        raise ValueError(f"{where}: no bot turn, so nothing to learn; add one or drop the line")
    return rounds


def read_conversations(path: Path) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """``(path:line, rounds)`` for every non-blank line; a ValueError names the first bad line."""
    for where, rounds, _ in read_tagged_conversations(path):
        yield where, rounds


def read_tagged_conversations(path: Path) -> Iterator[tuple[str, list[dict[str, str]], Any]]:
    """``(path:line, rounds, the line's TASK_FIELD or None)`` for every non-blank line, checked as
    :func:`read_conversations` does; the task field is returned as written, for the caller to check."""
    with path.open("rb") as f:  # bytes: a line that is not UTF-8 is reported with its number
        for line_no, line in enumerate(f, 1):
            where = f"{path}:{line_no}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg}, column {err.colno}); "
                                 "fix or remove the line") from None
            except UnicodeDecodeError:
                raise ValueError(f"{where}: not UTF-8 text; re-encode the file as UTF-8") from None
            yield where, _rounds(row, where), row.get(TASK_FIELD) if isinstance(row, dict) else None


def chat_template_segments(
    rounds: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase
) -> list[tuple[str, bool]]:
    """The conversation as rendered by the tokenizer's ``chat_template``, cut into ``(text, is_response)``.

    Why prefix by prefix: a Jinja template is opaque, so the only way to know where a bot turn begins
    and ends is to render the conversation up to it with ``add_generation_prompt=True`` (the text an
    inference prompt ends with: every role marker, the assistant header included) and up to and
    including it; the difference is the bot's turn. ``return_assistant_tokens_mask`` would be simpler
    but needs ``{% generation %}`` in the template, which the templates that ship with Llama-3, Qwen2
    and Mistral do not have. The method rests on each rendering being a prefix of the next; a template
    that rewrites earlier turns (one that drops reasoning from past turns, say) breaks that, and then
    this raises instead of guessing.
    """
    messages = [{"role": HF_ROLES[turn["role"]], "content": turn["content"]} for turn in rounds]
    name = f"the chat_template of tokenizer {tokenizer.name_or_path}"
    segments: list[tuple[str, bool]] = []
    done = ""

    def extend(upto: int, generation_prompt: bool, learn: bool) -> None:
        nonlocal done
        text = tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)
        if not text.startswith(done):
            raise ValueError(f"{name} does not render the conversation prefix by prefix (rendering up to turn "
                             f"{upto - 1} changes the text of the turns before it), so the response tokens cannot "
                             "be located; leave chat_template unset to use llmhift's template")
        segments.append((text[len(done):], learn))
        done = text

    try:
        for k, turn in enumerate(rounds):
            if turn["role"] == "bot":
                extend(k, True, False)  # everything up to the assistant header: prompt
                extend(k + 1, False, True)  # the bot's content and its end of turn
        extend(len(rounds), False, False)  # turns after the last bot turn teach nothing
    except TemplateError as err:
        raise ValueError(f"{name} fails on this conversation ({err}); "
                         "fix the data or leave chat_template unset") from None
    return segments


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of every special token, including added ones (Llama-3's <|eot_id|>) not in all_special_ids."""
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return added | set(tokenizer.all_special_ids)


def _encode_with_tokenizer_template(
    rounds: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    special = _special_ids(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    for text, learn in chat_template_segments(rounds, tokenizer):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        stop = 0  # tokens piece[:stop] are learned
        if learn:
            ends = [i for i, t in enumerate(piece) if t in special]
            if not ends:
                raise ValueError(f"the chat_template of tokenizer {tokenizer.name_or_path} ends a bot turn with no "
                                 "special token, so the model could not learn to stop; leave chat_template unset")
            stop = ends[-1] + 1
        ids.extend(piece)
        labels.extend(piece[:stop] + [IGNORE_INDEX] * (len(piece) - stop))
    return ids, labels


def encode_conversation(
    rounds: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, template: Mapping[str, str] | str
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its labels (-100 outside bot responses).

    With ``template == TOKENIZER_TEMPLATE`` a response is the bot's content through its end-of-turn
    token, taken as the last special token of the turn (``<|eot_id|>``, ``<|im_end|>``): what the
    template writes after it (ChatML's newline) is glue before the next header and is not learned.
    Each segment is tokenized alone, as an inference prompt is, so no token straddles the boundary.
    """
    if template == TOKENIZER_TEMPLATE:
        return _encode_with_tokenizer_template(rounds, tokenizer)
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


def resolve_template(chat_template: Mapping[str, str] | str | None) -> Mapping[str, str] | str:
    """llmhift's template (the default), a checked ``{system, human, bot}`` mapping, or
    :data:`TOKENIZER_TEMPLATE`; a ValueError starting with ``chat_template:`` otherwise."""
    if chat_template is None:
        return DEFAULT_CHAT_TEMPLATE
    if chat_template == TOKENIZER_TEMPLATE:
        return TOKENIZER_TEMPLATE
    if chat_template == MFTCODER_TEMPLATE:
        return MFTCODER_ROLES
    if not isinstance(chat_template, Mapping):
        raise ValueError(f"chat_template: {chat_template!r} is unknown; give {TOKENIZER_TEMPLATE!r} (the "
                         f"tokenizer's own template), {MFTCODER_TEMPLATE!r} or a {{system, human, bot}} mapping "
                         "of texts around {content}")
    template = dict(chat_template)
    bad = [r for r in ROLES if not isinstance(template.get(r), str) or template[r].count("{content}") != 1]
    if bad:
        raise ValueError(f"chat_template: roles {bad} need a text with exactly one {{content}} each")
    return template


def require_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """A ValueError naming the fix when ``chat_template: tokenizer`` meets a tokenizer without one."""
    if not tokenizer.chat_template:
        raise ValueError(f"chat_template: tokenizer {tokenizer.name_or_path} has no chat_template; leave "
                         "chat_template unset for llmhift's {system, human, bot} template, or point "
                         "dataset.tokenizer at a tokenizer folder that has one")


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, template: Mapping[str, str] | str) -> None:
    """A ValueError naming the fix unless ``tokenizer`` can encode with the resolved ``template``: the
    tokenizer's own template needs a ``chat_template``, and every template ends responses with EOS."""
    if template == TOKENIZER_TEMPLATE:
        require_chat_template(tokenizer)
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer: has no EOS token; responses must end with one")


def encode_at(where: str, rounds: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase,
              template: Mapping[str, str] | str) -> tuple[list[int], list[int]]:
    """:func:`encode_conversation`, its ValueError prefixed with ``chat_template:`` and the line."""
    try:
        return encode_conversation(rounds, tokenizer, template)
    except ValueError as err:
        raise ValueError(f"chat_template: {where}: {err}") from None


class InstructionDataset(Dataset):
    """Tokenized instruction samples from ``<folder>/<split>.jsonl``, all ``max_seq_len`` long.

    Args:
        folder (str | Path): holds ``<split>.jsonl``.
        split (str): ``train``, ``eval``, ...
        tokenizer (PreTrainedTokenizerBase): needs an EOS token; padding uses its pad token (or EOS).
        max_seq_len (int): tokens per sample.
        chat_template (Mapping[str, str] | str, optional): role -> text with one ``{content}``, or
            :data:`TOKENIZER_TEMPLATE` for the tokenizer's own. Default: :data:`DEFAULT_CHAT_TEMPLATE`.
        packing (bool): fill rows with several conversations. Default: ``False``.
    """

    def __init__(
        self,
        folder: str | Path,
        split: str,
        tokenizer: PreTrainedTokenizerBase,
        max_seq_len: int,
        chat_template: Mapping[str, str] | str | None = None,
        packing: bool = False,
    ) -> None:
        template = resolve_template(chat_template)
        check_tokenizer(tokenizer, template)
        path = Path(folder) / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.max_seq_len = max_seq_len
        conversations = []
        for where, rounds in read_conversations(path):
            ids, labels = encode_at(where, rounds, tokenizer, template)
            conversations.append((ids[:max_seq_len], labels[:max_seq_len]))
        self.rows = [compact(row) for row, _ in make_rows(conversations, max_seq_len, packing)]
        if not self.rows:
            raise ValueError(f"{path}: no sample keeps a response token within max_seq_len={max_seq_len}")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return padded_sample(*self.rows[i], self.max_seq_len, self.pad_id)


Row = tuple[list[int], list[int]]  # token ids and labels of one row or conversation


def make_rows(conversations: list[Row], max_seq_len: int, packing: bool) -> list[tuple[Row, int]]:
    """Rows of at most ``max_seq_len`` tokens, each with the index of its first conversation: one
    conversation each, or with ``packing`` as many as fit, in order (a new row when the next one does
    not fit). Rows without a response token are dropped: a conversation whose responses were all cut
    off teaches nothing, and its loss would be 0/0."""
    rows: list[tuple[Row, int]] = []
    for i, (ids, labels) in enumerate(conversations):
        if packing and rows and len(rows[-1][0][0]) + len(ids) <= max_seq_len:
            rows[-1][0][0].extend(ids)
            rows[-1][0][1].extend(labels)
        else:
            rows.append(((list(ids), list(labels)), i))
    return [(row, first) for row, first in rows if any(t != IGNORE_INDEX for t in row[1])]


def compact(row: Row) -> tuple[np.ndarray, np.ndarray]:
    """A row as two int32 arrays: a tenth of a list's memory, and :func:`padded_sample` copies them fast."""
    return np.asarray(row[0], dtype=np.int32), np.asarray(row[1], dtype=np.int32)


def padded_sample(ids: np.ndarray, labels: np.ndarray, max_seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``{input_ids, labels, attention_mask}`` of ``max_seq_len`` tokens from a :func:`compact` row,
    padded on the right."""
    n = len(ids)
    input_ids = torch.full((max_seq_len,), pad_id, dtype=torch.long)  # (T,)
    input_ids[:n] = torch.from_numpy(ids)
    targets = torch.full((max_seq_len,), IGNORE_INDEX, dtype=torch.long)  # (T,)
    targets[:n] = torch.from_numpy(labels)
    return {"input_ids": input_ids, "labels": targets, "attention_mask": (torch.arange(max_seq_len) < n).long()}


def check_instruction_dataset(
    dataset: Any, build_demo: bool = False, conversations: Iterable[tuple[str, list[dict[str, str]]]] | None = None
) -> None:
    """Checks a loader's ``dataset`` section (``local``, ``split``, ``tokenizer``, ``max_seq_len``,
    ``chat_template``) and every line of its jsonl before anything heavy starts; builds the demo set
    into ``local`` when asked and missing. Errors start with the offending field's name.
    ``conversations`` (``(path:line, rounds)``) replaces ``<local>/<split>.jsonl``: the multi-task
    loader reads its task files itself (its errors name their field).

    With the tokenizer's template, one conversation of each role sequence is encoded here, so a
    template that does not render prefix by prefix fails now rather than after minutes of tokenizing.
    """
    path = Path(dataset.local) / f"{dataset.split}.jsonl"
    if conversations is None:
        if build_demo and not path.is_file():
            build_demo_instructions(dataset.local)
        if not path.is_file():
            raise ValueError(f"local: {path} does not exist (an instruction folder holds <split>.jsonl)")
    if dataset.max_seq_len is None or dataset.max_seq_len < 2:
        raise ValueError(f"max_seq_len: the instruction loader needs a row length of at least 2, got {dataset.max_seq_len}")
    folder = Path(dataset.tokenizer or "")
    if dataset.tokenizer is None or not (folder / "tokenizer_config.json").is_file():
        raise ValueError(f"tokenizer: {dataset.tokenizer!r} is not a local tokenizer folder (llmhift never downloads)")
    template = resolve_template(dataset.chat_template)
    shapes: dict[tuple[str, ...], tuple[str, list[dict[str, str]]]] = {}
    try:
        for where, rounds in read_conversations(path) if conversations is None else conversations:
            shapes.setdefault(tuple(turn["role"] for turn in rounds), (where, rounds))
    except ValueError as err:
        raise ValueError(f"local: {err}" if conversations is None else str(err)) from None
    if not shapes:
        raise ValueError(f"local: {path} holds no conversation; write one JSON object per line: {SHAPES}")
    if template == TOKENIZER_TEMPLATE:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        require_chat_template(tokenizer)
        for where, rounds in shapes.values():
            encode_at(where, rounds, tokenizer, template)


_DEMO_MODULES = ("json", "os.path", "re", "string", "textwrap", "shutil", "random", "math", "itertools",
                 "functools", "collections", "statistics", "fractions", "heapq", "bisect", "base64",
                 "difflib", "fnmatch", "glob", "calendar", "copy", "csv", "html", "zlib", "gzip", "pathlib")


def docstring_pairs() -> list[dict[str, str]]:
    """``{prompt, response}``: "What does `json.dumps` do?" -> the first sentence of its docstring."""
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


def arithmetic_chats(n: int, rng: random.Random) -> list[dict[str, Any]]:
    """``n`` two-round ``chat_rounds`` (a system turn, a sum, then a product) with exact answers."""
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
    rows: list[dict[str, Any]] = docstring_pairs() + arithmetic_chats(600, rng)
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
