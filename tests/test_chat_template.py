"""The tokenizer's own chat template (``dataset.chat_template: tokenizer``): loss on assistant content and its
end-of-turn token only, for a Llama-3-style and a ChatML-style template; and bad instruction data fails in one line.

The tokenizer is a small byte-level BPE trained here on the demo instruction set, with the templates' special
tokens added and ``chat_template`` set to a Jinja string written in this file: nothing is downloaded.
"""

import json
import math
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

import train
from llmhift.datasets.demo_data import train_tokenizer
from llmhift.datasets.instruction import TOKENIZER_TEMPLATE, InstructionDataset, build_demo_instructions
from tests.helpers import REPO_ROOT

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-style: the reasoning of past assistant turns is dropped, so an earlier rendering is not a prefix of a later one
DROPS_PAST_REASONING = (
    "{% for m in messages %}{% set c = m['content'] %}{% if m['role'] == 'assistant' and not loop.last %}"
    "{% set c = c.split('</think>')[-1] %}{% endif %}<|im_start|>{{ m['role'] }}\n{{ c }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_END_OF_TURN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                 "{% if add_generation_prompt %}assistant: {% endif %}"
SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]

ROUNDS = [{"role": "system", "content": "Be brief."}, {"role": "human", "content": "What is 2 + 3?"},
          {"role": "bot", "content": "2 + 3 = 5."}, {"role": "human", "content": "And times 4?"},
          {"role": "bot", "content": "5 * 4 = 20."}]
HF_MESSAGES = [{"role": {"human": "user", "bot": "assistant"}.get(r["role"], r["role"]), "content": r["content"]}
               for r in ROUNDS]
# The same conversation rendered by hand, cut where the loss starts and stops: (text, learned).
LLAMA3_PIECES = [
    ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
    ("2 + 3 = 5.<|eot_id|>", True),
    ("<|start_header_id|>user<|end_header_id|>\n\nAnd times 4?<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
    ("5 * 4 = 20.<|eot_id|>", True),
]
CHATML_PIECES = [
    ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n",
     False),
    ("2 + 3 = 5.<|im_end|>", True),
    ("\n<|im_start|>user\nAnd times 4?<|im_end|>\n<|im_start|>assistant\n", False),  # the newline after <|im_end|>
    ("5 * 4 = 20.<|im_end|>", True),
    ("\n", False),
]


@pytest.fixture(scope="module")
def instructions(tmp_path_factory):
    return build_demo_instructions(tmp_path_factory.mktemp("instructions"))


@pytest.fixture(scope="module")
def base_tokenizer(instructions, tmp_path_factory):
    """A 1024-token BPE plus the templates' special tokens: 1030 ids, within the demo model's 2048."""
    texts = (instructions / "train.jsonl").read_text().splitlines()
    tokenizer = train_tokenizer(texts, tmp_path_factory.mktemp("bpe"), vocab_size=1024)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    return tokenizer


def with_template(base_tokenizer, template, folder, bos=None):
    """A tokenizer folder as an instruct model ships it: special tokens, BOS, and its chat_template."""
    base_tokenizer.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = template  # None: a base model's tokenizer
    if bos:
        tokenizer.bos_token = bos
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def write(folder, lines):
    """train.jsonl and eval.jsonl; a str or bytes line is written as it is, anything else as JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    data = b"".join((line if isinstance(line, bytes) else line.encode() if isinstance(line, str)
                     else json.dumps(line).encode()) + b"\n" for line in lines)
    for split in ("train", "eval"):
        (folder / f"{split}.jsonl").write_bytes(data)
    return folder


def expected(tokenizer, pieces):
    ids, labels = [], []
    for text, learned in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if learned else [-100] * len(piece)
    return ids, labels


@pytest.mark.parametrize("name, template, bos, pieces, end_of_turn", [
    ("llama3", LLAMA3, "<|begin_of_text|>", LLAMA3_PIECES, "<|eot_id|>"),
    ("chatml", CHATML, None, CHATML_PIECES, "<|im_end|>"),
])
def test_labels_cover_assistant_content_and_end_of_turn_only(name, template, bos, pieces, end_of_turn,
                                                             base_tokenizer, tmp_path):
    tokenizer = with_template(base_tokenizer, template, tmp_path / name, bos)
    folder = write(tmp_path / "data", [{"chat_rounds": ROUNDS}])
    sample = InstructionDataset(folder, "train", tokenizer, 128, TOKENIZER_TEMPLATE)[0]
    ids, labels = expected(tokenizer, pieces)
    n = len(ids)
    assert ids == tokenizer.apply_chat_template(HF_MESSAGES, tokenize=True, return_dict=False)  # the template's own tokens, unchanged
    assert sample["input_ids"][:n].tolist() == ids
    assert sample["labels"].tolist() == labels + [-100] * (128 - n)  # token by token, padding ignored
    assert sample["attention_mask"].tolist() == [1] * n + [0] * (128 - n)
    learned = [tokenizer.convert_ids_to_tokens(t) for t in labels if t != -100]
    assert learned.count(end_of_turn) == 2 and learned[-1] == end_of_turn  # both assistant turns end with it
    assert not set(learned) & (set(SPECIAL) - {end_of_turn})  # no role marker is learned


def test_hf_roles_packing_and_truncation(base_tokenizer, tmp_path):
    tokenizer = with_template(base_tokenizer, CHATML, tmp_path / "tok")
    rows = [{"messages": HF_MESSAGES}] + [{"prompt": f"Say {i}.", "response": f"{i}."} for i in range(6)]
    folder = write(tmp_path / "data", rows)
    padded = InstructionDataset(folder, "train", tokenizer, 128, TOKENIZER_TEMPLATE)
    packed = InstructionDataset(folder, "train", tokenizer, 128, TOKENIZER_TEMPLATE, packing=True)
    ids, labels = expected(tokenizer, CHATML_PIECES)
    assert padded[0]["labels"][:len(labels)].tolist() == labels  # `messages` with user/assistant roles: same labels
    assert len(padded) == 7 and len(packed) < 7
    count = lambda ds: sum(int((ds[i]["labels"] != -100).sum()) for i in range(len(ds)))  # noqa: E731
    assert count(packed) == count(padded)  # packing loses no response token
    cut = InstructionDataset(folder, "train", tokenizer, 40, TOKENIZER_TEMPLATE)[0]
    assert cut["input_ids"].tolist() == ids[:40] and cut["labels"].tolist() == labels[:40]


@pytest.mark.parametrize("template, message", [
    (DROPS_PAST_REASONING, "does not render the conversation prefix by prefix"),
    (NO_END_OF_TURN, "ends a bot turn with no special token"),
])
def test_templates_whose_boundary_cannot_be_found_fail_in_one_line(template, message, base_tokenizer, tmp_path):
    tokenizer = with_template(base_tokenizer, template, tmp_path / "tok")
    rounds = [dict(r) for r in ROUNDS]
    rounds[2]["content"] = "<think>3 more than 2</think>2 + 3 = 5."
    folder = write(tmp_path / "data", [{"prompt": "Hi", "response": "Hello."}, {"chat_rounds": rounds}])
    with pytest.raises(ValueError) as err:
        InstructionDataset(folder, "train", tokenizer, 128, TOKENIZER_TEMPLATE)
    text = str(err.value)
    assert "\n" not in text and message in text and str(tmp_path / "tok") in text
    assert text.startswith("chat_template: ") and "leave chat_template unset" in text


def train_args(instructions, tokenizer_root, save_folder, *extra):
    """yamls/demo/hift.yaml on our tokenizer (data_root/tokenizer) and instruction folder; no demo corpus."""
    return ["yamls/demo/hift.yaml", f"variables.data_root={tokenizer_root}", f"variables.instructions={instructions}",
            "demo_data=null", f"save_folder={save_folder}", "progress_bar=false", "log_to_console=false", *extra]


def test_train_py_fine_tunes_with_the_tokenizer_template(instructions, base_tokenizer, tmp_path):
    with_template(base_tokenizer, CHATML, tmp_path / "root" / "tokenizer")
    args = train_args(instructions, tmp_path / "root", tmp_path / "ck", "max_duration=4ba", "eval_interval=4ba",
                      "save_interval=4ba", "eval_subset_num_batches=1",
                      f"train_loader.dataset.chat_template={TOKENIZER_TEMPLATE}",
                      f"eval_loader.dataset.chat_template={TOKENIZER_TEMPLATE}")
    assert train.main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "ck" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/train/total"] for r in records if "loss/train/total" in r]
    evals = [r["metrics/eval/LanguageCrossEntropy"] for r in records if "metrics/eval/LanguageCrossEntropy" in r]
    assert len(losses) == 4 and all(0 < x < 2 * math.log(2048) for x in losses), losses
    assert len(evals) == 1 and 0 < evals[0] < 2 * math.log(2048), evals
    assert (tmp_path / "ck" / "latest-rank0.pt").exists()


GOOD = {"prompt": "Hi", "response": "Hello."}
THINKING = {"chat_rounds": [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "<think>a</think>5"},
                            {"role": "user", "content": "* 4?"}, {"role": "assistant", "content": "20"}]}
WITH_TEMPLATE = f"train_loader.dataset.chat_template={TOKENIZER_TEMPLATE}"
# fault -> (jsonl lines, tokenizer template, overrides, what the one-line error says after `train_loader.dataset.`)
# One fault runs through a fresh `python train.py` (exit code and streams as a user sees them); the others
# take the same train.main in-process, which saves an interpreter start (~10 s of CPU) each.
SUBPROCESS_FAULTS = {
    "broken_json_line": ([GOOD, '{"prompt": "Hi", "response": '], None, [], "local: ", "train.jsonl:2: not valid JSON"),
}
IN_PROCESS_FAULTS = {
    "missing_response": ([GOOD, {"prompt": "Hi"}], None, [], "local: ",
                         """train.jsonl:2: field 'response' is missing; write {"prompt": str, "response": str} or"""),
    "unknown_role": ([GOOD, GOOD, {"chat_rounds": [{"role": "tool", "content": "{}"}, {"role": "bot", "content": "x"}]}],
                     None, [], "local: ", "train.jsonl:3: chat_rounds[0].role 'tool' is unknown; use one of system"),
    "tokenizer_without_template": ([GOOD], None, [WITH_TEMPLATE], "chat_template: tokenizer ",
                                   "has no chat_template; leave chat_template unset for llmhift's"),
    "missing_content": ([{"chat_rounds": [{"role": "human"}, {"role": "bot", "content": "x"}]}], None, [], "local: ",
                        "train.jsonl:1: field chat_rounds[0].content is missing"),
    "line_not_an_object": ([GOOD, [1, 2]], None, [], "local: ", "train.jsonl:2: a line must be a JSON object, got list"),
    "no_known_field": ([{"question": "?"}], None, [], "local: ", "train.jsonl:1: no field 'prompt', 'response' or"),
    "no_bot_turn": ([{"messages": [{"role": "user", "content": "Hi"}]}], None, [], "local: ",
                    "train.jsonl:1: no bot turn, so nothing to learn"),
    "not_utf8": ([GOOD, b'{"prompt": "\xff"}'], None, [], "local: ", "train.jsonl:2: not UTF-8 text"),
    "empty_file": ([], None, [], "local: ", "train.jsonl holds no conversation"),
    "unknown_template_name": ([GOOD], None, ["train_loader.dataset.chat_template=jinja"], "chat_template: ",
                              "'jinja' is unknown; give 'tokenizer'"),
    "template_rewrites_past_turns": ([GOOD, THINKING], DROPS_PAST_REASONING, [WITH_TEMPLATE], "chat_template: ",
                                     "train.jsonl:2: the chat_template of tokenizer"),
}


def fault_args(root, fault, base_tokenizer):
    """train.py's arguments for one fault: its jsonl folder and tokenizer under ``root/fault``."""
    lines, template, overrides, _, _ = {**SUBPROCESS_FAULTS, **IN_PROCESS_FAULTS}[fault]
    folder = write(root / fault / "data", lines)
    with_template(base_tokenizer, template, root / fault / "tokenizer")
    return train_args(folder, root / fault, root / fault / "ck", *overrides)


def assert_one_line_error(fault, rc, err, save_folder):
    field, detail = {**SUBPROCESS_FAULTS, **IN_PROCESS_FAULTS}[fault][3:]
    assert rc == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: train_loader.dataset.{field}"), err
    assert detail in lines[0], lines[0]
    assert not save_folder.exists()  # nothing written before the check


@pytest.fixture(scope="module")
def subprocess_runs(base_tokenizer, tmp_path_factory):
    """Each subprocess fault through ``python train.py``, the interpreters started together."""
    root = tmp_path_factory.mktemp("faults")
    processes = {fault: subprocess.Popen([sys.executable, "train.py", *fault_args(root, fault, base_tokenizer)],
                                         cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for fault in SUBPROCESS_FAULTS}
    results = {}
    for fault, process in processes.items():
        out, err = process.communicate(timeout=300)
        assert "Traceback" not in out, out
        results[fault] = process.returncode, err, root / fault / "ck"
    return results


@pytest.mark.parametrize("fault", SUBPROCESS_FAULTS)
def test_bad_instruction_data_is_one_line_from_train_py(fault, subprocess_runs):
    assert_one_line_error(fault, *subprocess_runs[fault])


@pytest.mark.parametrize("fault", IN_PROCESS_FAULTS)
def test_more_bad_instruction_data_is_one_line(fault, base_tokenizer, tmp_path, capsys):
    rc = train.main(fault_args(tmp_path, fault, base_tokenizer))
    assert_one_line_error(fault, rc, capsys.readouterr().err, tmp_path / fault / "ck")
