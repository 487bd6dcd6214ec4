"""HiFT on HF encoders (BERT, RoBERTa; random weights) through Composer's HuggingFaceModel: the units
are the embeddings, each layer and the classification head, in that order, and a real run trains one
unit per step; the example script runs offline."""

from __future__ import annotations

import json

import pytest

from scripts.hift_encoder import build_trainer, main
from tests.test_hift_peft import RecordChanges

LAYERS = 2
# Each architecture's units: the parameter-name prefixes (under HuggingFaceModel's `model.`) each holds.
UNITS = {
    "bert": {"embedding": ["bert.embeddings."], "head": ["bert.pooler.", "classifier."]},
    "roberta": {"embedding": ["roberta.embeddings."], "head": ["classifier."]},
}


@pytest.mark.parametrize("arch", sorted(UNITS))
def test_encoder_units_and_one_unit_per_step(arch):
    record = RecordChanges()
    trainer, hift = build_trainer(arch, steps=2 * (LAYERS + 2), layers=LAYERS, lr=1e-2, callbacks=[record])
    body = arch  # BertForSequenceClassification.bert, RobertaForSequenceClassification.roberta
    expected = {"embedding": UNITS[arch]["embedding"],
                **{f"block.{i}": [f"{body}.encoder.layer.{i}."] for i in range(LAYERS)},
                "head": UNITS[arch]["head"]}
    assert [name for name, _ in hift.units] == list(expected)
    everything = [n for n, _ in trainer.state.model.named_parameters()]
    for name, params in hift.units:  # each unit holds exactly the parameters under its prefixes
        assert params == [n for n in everything if n.removeprefix("model.").startswith(tuple(expected[name]))], name
    assert sum(len(params) for _, params in hift.units) == len(everything)
    assert any("LayerNorm" in n for n in hift.units[0][1])  # the embeddings' norm goes with them
    trainer.fit()
    for step, (changed, with_state) in enumerate(zip(record.changed, record.with_state)):
        unit = hift.units[step % (LAYERS + 2)][1]
        assert changed == set(unit), f"step {step}: changed {sorted(changed)}"
        assert with_state == set(unit), f"step {step}: optimizer state held for {sorted(with_state)}"


def test_example_script_prints_the_cycle(capsys):
    assert main(["--arch", "roberta", "--steps", "4"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines[0] == {"units": {"embedding": 5, "block.0": 16, "block.1": 16, "head": 4},
                        "groups": [[0], [1], [2], [3]]}
    assert [(line["step"], line["units"]) for line in lines[1:]] == [
        (0, ["embedding"]), (1, ["block.0"]), (2, ["block.1"]), (3, ["head"])]
