"""The offline multi-task demo set of ``yamls/demo/mft.yaml``: three instruction tasks made from the
running Python's standard library, in MFTCoder's layout (one folder per task, lines with ``id``,
``data_name`` and ``chat_rounds``).

* ``docstring_qa``: "What does `json.dumps` do?" -> the first sentence of its docstring;
* ``arithmetic``: two-round chats, a sum then a product, with a system turn;
* ``code_completion``: the first two lines of a pure-Python stdlib function (docstring removed) -> its
  next two (the hardest of the three for a small model, so the one the dynamic mix should move towards).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import random
import textwrap
from pathlib import Path
from typing import Any

from llmhift.atomic import atomic_directory
from llmhift.datasets.instruction import TASK_FIELD, arithmetic_chats, docstring_pairs

__all__ = ["DEMO_TASKS", "build_demo_tasks"]

DEMO_TASKS = ("docstring_qa", "arithmetic", "code_completion")
_CODE_MODULES = ("textwrap", "shutil", "fnmatch", "glob", "bisect", "heapq", "base64", "difflib", "calendar",
                 "statistics", "fractions", "string", "posixpath", "csv", "html", "copy", "random", "urllib.parse",
                 "email.utils", "ipaddress", "tokenize", "pprint", "inspect", "argparse", "ntpath", "quopri",
                 "platform", "locale", "gettext", "mimetypes", "sysconfig", "zipfile", "tarfile")


def _code_completions() -> list[dict[str, Any]]:
    rows = []
    for module_name in _CODE_MODULES:
        module = importlib.import_module(module_name)
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not inspect.isfunction(obj) or obj.__module__ != module.__name__:
                continue
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(obj))).body[0]
            except (OSError, TypeError, SyntaxError):  # a build without .py sources: a smaller task, not a wrong one
                continue
            if not isinstance(tree, ast.FunctionDef):
                continue
            if ast.get_docstring(tree) is not None:
                tree.body = tree.body[1:] or [ast.Pass()]
            lines = ast.unparse(tree).splitlines()  # normalised source without the docstring
            prompt, answer = "\n".join(lines[:2]), "\n".join(lines[2:4])
            if len(lines) >= 4 and len(prompt) + len(answer) <= 200:  # short enough for the demo's rows
                rows.append({"chat_rounds": [
                    {"role": "human", "content": "Complete this Python function:\n" + prompt},
                    {"role": "bot", "content": answer},
                ]})
    return rows


def _chats(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``{prompt, response}`` rows as MFTCoder's ``chat_rounds``; chats stay as they are."""
    return [row if "chat_rounds" in row else {"chat_rounds": [
        {"role": "human", "content": row["prompt"]}, {"role": "bot", "content": row["response"]}]} for row in rows]


def build_demo_tasks(folder: str | Path, seed: int = 17) -> Path:
    """Writes ``<folder>/<task>/{train,eval}.jsonl`` for :data:`DEMO_TASKS` (atomically) unless there."""
    folder = Path(folder)
    if all((folder / task / "train.jsonl").is_file() for task in DEMO_TASKS):
        return folder
    rng = random.Random(seed)
    sets = {"docstring_qa": _chats(docstring_pairs()), "arithmetic": arithmetic_chats(400, rng),
            "code_completion": _code_completions()}
    try:
        with atomic_directory(folder) as tmp:
            for task, rows in sets.items():
                rng.shuffle(rows)
                n_eval = max(len(rows) // 10, 4)
                (tmp / task).mkdir()
                for split, part in (("eval", rows[:n_eval]), ("train", rows[n_eval:])):
                    with (tmp / task / f"{split}.jsonl").open("w", encoding="utf-8") as f:
                        for i, row in enumerate(part):
                            line = {"id": f"{task}-{split}-{i}", TASK_FIELD: task, **row}
                            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    except FileExistsError:
        if not (folder / DEMO_TASKS[0] / "train.jsonl").is_file():
            raise
    return folder
