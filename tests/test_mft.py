"""Multi-task instruction tuning (MFTCoder-style): tasks in the data, the mftcoder template, task-balanced
losses exact over the global batch, per-task metrics, and the self-paced task weights."""

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate
from transformers import AutoTokenizer

from llmhift.callbacks.task_balance import convergence_weights
from llmhift.datasets.instruction import InstructionDataset
from llmhift.datasets.instruction_tasks import MultiTaskInstructionDataset, TaskMixDataset
from llmhift.labels import IGNORE_INDEX
from llmhift.models.causal_lm import TaskLoss, causal_lm_loss, next_token_targets
from tests.scripts import task_balance_ranks as ranks


@pytest.fixture(scope="module")
def tokenizer(demo_root):
    return AutoTokenizer.from_pretrained(demo_root / "tokenizer")


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(*turns, task=None):
    row = {"chat_rounds": [{"role": r, "content": c} for r, c in turns]}
    return {**row, "data_name": task} if task else row


# --- the mftcoder template ------------------------------------------------------------------------------

def test_mftcoder_template_token_by_token(tokenizer, tmp_path):
    write(tmp_path / "train.jsonl", [chat(("system", "Be brief."), ("human", "2+2?"), ("bot", "4."),
                                          ("human", "and 3+3?"), ("bot", "6."))])
    row = InstructionDataset(tmp_path, "train", tokenizer, 96, chat_template="mftcoder")[0]
    eos = tokenizer.eos_token_id
    prompt1 = ids(tokenizer, "<s>system\n") + ids(tokenizer, "Be brief.") + ids(tokenizer, "<s>human\n") + \
        ids(tokenizer, "2+2?") + ids(tokenizer, "<s>bot\n")
    answer1 = ids(tokenizer, "4.") + [eos]
    prompt2 = ids(tokenizer, "<s>human\n") + ids(tokenizer, "and 3+3?") + ids(tokenizer, "<s>bot\n")
    answer2 = ids(tokenizer, "6.") + [eos]
    expected = prompt1 + answer1 + prompt2 + answer2
    n = len(expected)
    assert row["input_ids"][:n].tolist() == expected
    assert row["labels"][:n].tolist() == [IGNORE_INDEX] * len(prompt1) + answer1 + [IGNORE_INDEX] * len(prompt2) + answer2
    assert row["attention_mask"].sum() == n and (row["labels"][n:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("template, message", [
    (None, "tokenizer: has no EOS token; responses must end with one"),
    ("tokenizer", "chat_template: tokenizer .* has no chat_template; leave chat_template unset"),
])
def test_one_and_many_task_loaders_refuse_a_tokenizer_alike(tokenizer, tmp_path, template, message):
    write(tmp_path / "train.jsonl", QA)
    write(tmp_path / "qa" / "train.jsonl", QA)
    if template is None:  # llmhift's template needs only an EOS token: take it away
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.eos_token = None
    with pytest.raises(ValueError, match=message):
        InstructionDataset(tmp_path, "train", tokenizer, 64, chat_template=template)
    with pytest.raises(ValueError, match=message):
        MultiTaskInstructionDataset(tmp_path, "train", tokenizer, 64, chat_template=template, tasks=["qa"])


# --- tasks in the data ----------------------------------------------------------------------------------

QA = [chat(("human", f"q{i}?"), ("bot", f"answer {i}.")) for i in range(3)]
MATH = [chat(("human", f"{i}+{i}?"), ("bot", f"{2 * i}")) for i in range(4)]


def task_folders(root):
    write(root / "qa" / "train.jsonl", QA)
    write(root / "math" / "train" / "part0.jsonl", MATH[:2])  # a <split>/ folder of several files
    write(root / "math" / "train" / "part1.jsonl", MATH[2:])
    return root


def rows_by_task(dataset):
    return [(dataset.tasks[t], row[0].tolist()) for row, t in zip(dataset.rows, dataset.row_tasks)]


def test_tasks_from_folders_a_mapping_or_data_name_agree(tokenizer, tmp_path):
    root = task_folders(tmp_path / "folders")
    by_folder = MultiTaskInstructionDataset(root, "train", tokenizer, 64, tasks=["qa", "math"])
    by_map = MultiTaskInstructionDataset(tmp_path, "train", tokenizer, 64,
                                         tasks={"qa": str(root / "qa" / "train.jsonl"), "math": "folders/math"})
    write(tmp_path / "named" / "train.jsonl", [{**r, "data_name": "qa"} for r in QA] +
          [{**r, "data_name": "math"} for r in MATH])
    by_name = MultiTaskInstructionDataset(tmp_path / "named", "train", tokenizer, 64, task_names=["qa", "math"])
    assert by_folder.tasks == by_map.tasks == by_name.tasks == ["qa", "math"]
    assert rows_by_task(by_folder) == rows_by_task(by_map) == rows_by_task(by_name)
    assert [t for t, _ in rows_by_task(by_folder)] == ["qa"] * 3 + ["math"] * 4
    assert by_folder[3]["domain_idx"].item() == 1 and by_folder[0]["domain_idx"].item() == 0


@pytest.mark.parametrize("lines, kwargs, message", [
    ([{**QA[0], "data_name": "qa"}, chat(("human", "x"), ("bot", "y"), task="web")], {"task_names": ["qa"]},
     "task_names: {path}:2: data_name 'web' is not a known task ['qa']; add it to task_names or fix the line"),
    ([{**QA[0], "data_name": "qa"}, QA[1]], {"task_names": ["qa"]},
     "task_names: {path}:2: no 'data_name' field; give every line its task (one of ['qa'])"),
])
def test_unknown_or_missing_task_names_are_one_line_errors_naming_file_and_line(tokenizer, tmp_path, lines, kwargs,
                                                                                message):
    path = write(tmp_path / "train.jsonl", lines)
    with pytest.raises(ValueError) as err:
        MultiTaskInstructionDataset(tmp_path, "train", tokenizer, 64, **kwargs)
    assert str(err.value) == message.format(path=path)


def test_a_line_naming_another_task_than_its_folder_is_refused(tokenizer, tmp_path):
    path = write(tmp_path / "qa" / "train.jsonl", [QA[0], {**QA[1], "data_name": "math"}])
    with pytest.raises(ValueError, match=rf"^tasks: {path}:2: data_name 'math' but the line is in task 'qa'"):
        MultiTaskInstructionDataset(tmp_path, "train", tokenizer, 64, tasks=["qa"])


def test_packing_never_mixes_tasks_unless_mixed(tokenizer, tmp_path):
    # interleaved in the file: qa, math, qa, math, ...; every conversation is short, so rows could mix
    write(tmp_path / "train.jsonl", [{**r, "data_name": t} for pair in zip(QA, MATH) for r, t in zip(pair, ("qa", "math"))])
    kwargs = dict(task_names=["qa", "math"], chat_template="mftcoder")
    packed = MultiTaskInstructionDataset(tmp_path, "train", tokenizer, 128, packing=True, **kwargs)
    alone = MultiTaskInstructionDataset(tmp_path, "train", tokenizer, 128, packing=False, **kwargs)
    assert len(packed) == 2 < len(alone) == 6  # one row per task, each holding all of its conversations
    for task in (0, 1):
        mine = [row[0].tolist() for row, t in zip(alone.rows, alone.row_tasks) if t == task]
        assert [row[0].tolist() for row, t in zip(packed.rows, packed.row_tasks) if t == task] == [sum(mine, [])]
    mixed = MultiTaskInstructionDataset(tmp_path, "train", tokenizer, 128, packing="mixed", **kwargs)
    assert len(mixed) == 1 and mixed.row_tasks == [0]  # the row counts as its first conversation's task
    assert mixed.rows[0][0].tolist() == sum((alone.rows[i][0].tolist() for i in (0, 3, 1, 4, 2, 5)), [])


def test_task_stream_reads_every_task_row_and_resumes(tokenizer, tmp_path):
    rows = MultiTaskInstructionDataset(task_folders(tmp_path), "train", tokenizer, 64, tasks=["qa", "math"])
    stream = TaskMixDataset(rows, batch_size=2, proportion=[0.5, 0.5], lookahead_batches=1)
    it = iter(stream)
    first = [next(it) for _ in range(14)]
    for sample in first:  # each sample is one of its task's rows, whole
        task = int(sample["domain_idx"])
        match = [i for i, t in enumerate(rows.row_tasks) if t == task and torch.equal(rows[i]["input_ids"],
                                                                                       sample["input_ids"])]
        assert match, sample
    resumed = TaskMixDataset(rows, batch_size=2, proportion=[0.5, 0.5], lookahead_batches=1)
    resumed.load_state_dict(stream.state_dict(8))
    again = iter(resumed)
    for sample in first[8:]:
        other = next(again)
        assert torch.equal(other["input_ids"], sample["input_ids"]) and other["domain_idx"] == sample["domain_idx"]


# --- the balanced losses ----------------------------------------------------------------------------------

def token_losses(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="none").view(targets.shape)


def hand_loss(logits, targets, tasks, gamma=None, weights=None):
    """sum over present tasks of w_t * (mean over the task's tokens of f(l)) / sum of present w."""
    loss = token_losses(logits, targets)
    if gamma is not None:
        loss = (1 - torch.exp(-loss)) ** gamma * loss
    total, weight_sum = 0.0, 0.0
    for t in sorted(set(tasks.tolist())):
        mask = (tasks == t)[:, None] & (targets != IGNORE_INDEX)
        w = 1.0 if weights is None else weights[t]
        total = total + w * loss[mask].sum() / mask.sum()
        weight_sum += w
    return total / weight_sum


def one_batch():
    batch = default_collate(ranks.global_batch())
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(*batch["input_ids"].shape, ranks.VOCAB, generator=g, requires_grad=True)
    return batch, logits, next_token_targets(batch)


@pytest.mark.parametrize("mode, gamma, weights", [("task", None, None), ("focal", 2.0, None), ("focal", 0.5, None),
                                                  ("self_paced", None, [0.2, 0.5, 0.3])])
def test_balanced_loss_equals_a_hand_computation(mode, gamma, weights):
    batch, logits, targets = one_batch()
    loss = TaskLoss(ranks.TASKS, mode, gamma=gamma or 2.0)
    if weights:
        loss.weights = torch.tensor(weights, dtype=torch.float64)
    counts = torch.zeros(3).index_add_(0, batch["domain_idx"], (targets != IGNORE_INDEX).sum(1).float())
    loss.begin_batch(counts, 8)
    value = loss.loss(logits, targets, batch["domain_idx"])
    assert torch.allclose(value, hand_loss(logits, targets, batch["domain_idx"], gamma, weights), rtol=1e-6)
    # the recorded per-task sums are the plain token sums, whatever the balance
    tokens = token_losses(logits, targets).sum(1).detach()
    for t in range(3):
        assert math.isclose(loss.sums[t].item(), tokens[batch["domain_idx"] == t].sum().item(), rel_tol=1e-6)


def test_token_balance_is_the_plain_mean_and_task_needs_the_callback():
    batch, logits, targets = one_batch()
    token = TaskLoss(ranks.TASKS, "token")
    token.begin_batch(torch.ones(3), 8)
    assert torch.allclose(token.loss(logits, targets, batch["domain_idx"]), causal_lm_loss(logits, targets), rtol=1e-6)
    with pytest.raises(RuntimeError, match="add llmhift.callbacks.TaskBalanceCallback"):
        TaskLoss(ranks.TASKS, "task").loss(logits, targets, batch["domain_idx"])


def reference(loss_balance="task"):
    """Gradients and per-task eval losses of the whole global batch / eval set in one process, by hand."""
    model = ranks.model(loss_balance)
    batch = default_collate(ranks.global_batch())
    targets = next_token_targets(batch)
    hand_loss(model(batch), targets, batch["domain_idx"]).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    evals = default_collate(ranks.eval_set())
    with torch.no_grad():
        losses = token_losses(model(evals), next_token_targets(evals))
    valid = next_token_targets(evals) != IGNORE_INDEX
    per_task = {}
    for t, name in enumerate(ranks.TASKS):
        mask = (evals["domain_idx"] == t)[:, None] & valid
        per_task[f"{name}_LanguageCrossEntropy"] = (losses[mask].sum() / mask.sum()).item()
    return grads, per_task


def assert_matches(result, grads, per_task):
    assert result["grads"].keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(result["grads"][name], grad, rtol=1e-5, atol=1e-7), name
    for key, value in per_task.items():
        if math.isnan(value):  # a task without eval rows: NaN on every rank, as in one process
            assert math.isnan(result["eval"][key]), key
        else:
            assert math.isclose(result["eval"][key], value, rel_tol=1e-6), (key, result["eval"][key], value)


def test_task_gradient_under_accumulation_equals_the_global_batch(tmp_path):
    ranks.run(tmp_path, microbatch=3)  # 8 rows in micro-batches of 3, 3 and 2: uneven accumulation
    assert_matches(torch.load(tmp_path / "rank0.pt"), *reference())


@pytest.mark.slow
def test_two_ranks_give_the_global_gradient_and_the_one_process_task_metrics(tmp_path):
    # 2 gloo ranks forked by the script (no launcher): they share one import of torch and Composer; the
    # script gives each rank every variable a launcher sets, whatever this process's environment holds
    process = subprocess.run([sys.executable, str(ranks.__file__), str(tmp_path / "out"), "2", "--fork", "2"],
                             capture_output=True, text=True, timeout=240)  # fmt: skip
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    grads, per_task = reference()
    for rank in (0, 1):  # 4 rows per rank in micro-batches of 2; rank 1 holds no `code` row
        result = torch.load(tmp_path / "out" / f"rank{rank}.pt")
        assert result["world"] == 2
        assert_matches(result, grads, per_task)


# --- self-paced weights -------------------------------------------------------------------------------

def test_convergence_weights_by_hand():
    assert convergence_weights([[1.0, 1.0], [0.9, 0.8]]) == [0.5, 0.5]  # fewer than 3 evaluations
    history = [[1.0, 1.0], [0.8, 0.9], [0.7, 0.85]]  # task 0 converges faster than task 1
    # window 5 covers everything: slopes at evaluation 2 (two points) and 3 (three points)
    a = [[-0.2, -0.1], [-0.15, -0.075]]  # least-squares slopes per task
    m = [-0.1, -0.075]  # slopes of the per-evaluation maximum [1.0, 0.9, 0.85]
    K, M = 2, 2

    def softmax(x):
        e = [math.exp(v - max(x)) for v in x]
        return [v / sum(e) for v in e]

    rcs = softmax([K * a[-1][k] / (abs(a[-1][0]) + abs(a[-1][1])) for k in range(K)])
    acs = softmax([-M * a[-1][k] / (abs(a[0][k]) + abs(a[1][k])) for k in range(K)])
    df = min(M * softmax([-5.0 * M * v / (abs(m[0]) + abs(m[1])) for v in m])[-1], 1.0)
    expected = softmax([K * (df * r + (1 - df) * c) for r, c in zip(rcs, acs)])
    weights = convergence_weights(history)
    assert weights == pytest.approx(expected, rel=1e-12)
    assert weights[1] > weights[0]  # the slower task gets more weight
