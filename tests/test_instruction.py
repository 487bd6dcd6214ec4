"""Instruction data: only response tokens carry loss, chat rounds follow the template, packing and padding."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from llmhift.datasets.instruction import InstructionDataset, build_demo_instructions

TEMPLATE = {"system": "S:{content}|", "human": "H:{content}|", "bot": "B:{content}|"}


@pytest.fixture(scope="module")
def tokenizer(demo_root):
    return AutoTokenizer.from_pretrained(demo_root / "tokenizer")


def write(folder, rows):
    folder.mkdir(exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_tokens_are_masked_and_response_learned(tokenizer, tmp_path):
    folder = write(tmp_path / "d", [{"prompt": "What is 2+2?", "response": "It is 4."}])
    sample = InstructionDataset(folder, "train", tokenizer, 32, TEMPLATE)[0]
    eos = tokenizer.eos_token_id
    prompt = ids(tokenizer, "H:") + ids(tokenizer, "What is 2+2?") + ids(tokenizer, "|") + ids(tokenizer, "B:")
    response = ids(tokenizer, "It is 4.") + ids(tokenizer, "|") + [eos]
    n = len(prompt) + len(response)
    assert sample["input_ids"][:n].tolist() == prompt + response
    assert sample["labels"].tolist() == [-100] * len(prompt) + response + [-100] * (32 - n)
    assert sample["attention_mask"].tolist() == [1] * n + [0] * (32 - n)
    assert sample["input_ids"].shape == (32,)


def test_multi_turn_rounds_learn_every_bot_turn_only(tokenizer, tmp_path):
    rounds = [{"role": "system", "content": "Be brief."}, {"role": "human", "content": "Hi"},
              {"role": "bot", "content": "Hello."}, {"role": "human", "content": "Bye"},
              {"role": "bot", "content": "Bye."}]
    folder = write(tmp_path / "d", [{"chat_rounds": rounds}])
    sample = InstructionDataset(folder, "train", tokenizer, 64, TEMPLATE)[0]
    learned = [t for t in sample["labels"].tolist() if t != -100]
    eos = tokenizer.eos_token_id
    assert learned == ids(tokenizer, "Hello.") + ids(tokenizer, "|") + [eos] + ids(tokenizer, "Bye.") + ids(tokenizer, "|") + [eos]


def test_packing_fills_rows_and_truncation_keeps_learnable_samples(tokenizer, tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(10)]
    folder = write(tmp_path / "d", rows)
    padded = InstructionDataset(folder, "train", tokenizer, 64, TEMPLATE)
    packed = InstructionDataset(folder, "train", tokenizer, 64, TEMPLATE, packing=True)
    assert len(padded) == 10 and len(packed) < 10
    count = lambda ds: sum(int((ds[i]["labels"] != -100).sum()) for i in range(len(ds)))  # noqa: E731
    assert count(packed) == count(padded)  # packing loses no response token
    # a row too short for any response token is dropped, not trained on with an empty loss
    long_prompt = write(tmp_path / "e", [{"prompt": "x " * 50, "response": "y"}, *rows[:1]])
    assert len(InstructionDataset(long_prompt, "train", tokenizer, 16, TEMPLATE)) == 1


def test_bad_rows_and_templates_are_named(tokenizer, tmp_path):
    folder = write(tmp_path / "d", [{"question": "?"}])
    with pytest.raises(ValueError, match="train.jsonl:1: no field 'prompt', 'response' or 'chat_rounds'"):
        InstructionDataset(folder, "train", tokenizer, 32)
    folder = write(tmp_path / "e", [{"prompt": "a", "response": "b"}])
    with pytest.raises(ValueError, match="chat_template"):
        InstructionDataset(folder, "train", tokenizer, 32, {"system": "{content}", "human": "{content}", "bot": "x"})


def test_demo_instruction_set_is_built_offline(tokenizer, tmp_path):
    folder = build_demo_instructions(tmp_path / "instr")
    train = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    assert len(train) > 500
    assert any("chat_rounds" in r for r in train) and any(r.get("prompt", "").startswith("What does `") for r in train)
    dataset = InstructionDataset(folder, "eval", tokenizer, 128, packing=True)
    assert all(torch.any(dataset[i]["labels"] != -100) for i in range(len(dataset)))
