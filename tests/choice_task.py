"""A local multiple-choice task for lm-evaluation-harness: a jsonl and a task yaml, never downloaded."""

import json
from pathlib import Path

CHOICE_TASK = "llmhift_choice"
# Questions the demo tokenizer reads, the right choice first; a random tiny model gets some right.
QUESTIONS = [
    ("def add(a, b): return", [" a + b", " a - b", " None"]),
    ("The capital of France is", [" Paris", " a list of numbers", " import os"]),
    ("for i in range(10):", [" print(i)", " the river", " 42 apples"]),
    ("import numpy as", [" np", " the", " return"]),
    ("A function that returns nothing returns", [" None", " True", " seven"]),
    ("The data is stored in a", [" file", " banana", " while"]),
    ("x = [1, 2, 3]; len(x) is", [" 3", " 5", " blue"]),
    ("class Point: def __init__(self, x, y):", [" self.x = x", " red car", " 1 + 1"]),
]


def write_choice_task(folder: Path) -> Path:
    """``folder`` with ``choice.jsonl`` and the yaml of task :data:`CHOICE_TASK` (pass it as include_path)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "choice.jsonl"
    lines = []
    for i, (question, choices) in enumerate(QUESTIONS):  # the right choice moves: 0, 2, 1, 0, ...
        k = i % len(choices)
        lines.append({"question": question, "choices": choices[k:] + choices[:k], "answer": -k % len(choices)})
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / f"{CHOICE_TASK}.yaml").write_text(
        f"task: {CHOICE_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
        "metadata:\n  version: 1.0\n"
    )
    return folder
