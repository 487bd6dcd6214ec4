"""HiFT on an encoder for sequence classification, offline on CPU in seconds:
``python scripts/hift_encoder.py [--arch bert|roberta] [--steps 64] [--group-element 1]``.

train.py builds decoders only (its loaders are language-model text), so this example builds the Trainer
itself: a small randomly initialised BERT or RoBERTa (``*ForSequenceClassification``) through Composer's
``HuggingFaceModel``, a synthetic two-class task (does the sequence hold the marker token?), and
:class:`~llmhift.callbacks.hift.HiFTCallback`. HiFT finds the encoder's units from its structure: the
embeddings (tables and their LayerNorm), each layer, and the head (BERT's pooler and classifier,
RoBERTa's classification head). It prints the units, then one line per step: the group trained and
the loss. For a pretrained encoder, replace ``build_model``'s ``from_config`` by ``from_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import torch
from composer import Callback, State, Trainer
from composer.loggers import Logger
from composer.models import HuggingFaceModel
from composer.optim import DecoupledAdamW
from torch.utils.data import DataLoader, Dataset
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

from llmhift.callbacks.hift import HiFTCallback
from llmhift.callbacks.hift.schedule import STRATEGIES
from llmhift.errors import cli_errors

__all__ = ["ARCHS", "MarkerTask", "build_model", "build_trainer", "main"]

ARCHS = {"bert": (BertConfig, BertForSequenceClassification),
         "roberta": (RobertaConfig, RobertaForSequenceClassification)}
VOCAB, SEQ_LEN, MARKER = 128, 16, 5


class MarkerTask(Dataset):
    """Random token sequences, labelled 1 when the marker token occurs in them (half of them)."""

    def __init__(self, n: int = 128, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(MARKER + 1, VOCAB, (n, SEQ_LEN), generator=generator)  # (n, T), no marker
        self.labels = torch.arange(n) % 2
        where = torch.randint(1, SEQ_LEN, (n,), generator=generator)
        self.tokens[self.labels == 1, where[self.labels == 1]] = MARKER

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long),
                "labels": self.labels[i]}


def build_model(arch: str = "bert", layers: int = 2, hidden: int = 64, seed: int = 0) -> HuggingFaceModel:
    """A random ``arch`` classifier (2 labels) wrapped for Composer; the loss is the HF model's own."""
    config_class, model_class = ARCHS[arch]
    torch.manual_seed(seed)
    # RoBERTa numbers positions from padding_idx + 1, hence the two spare positions.
    config = config_class(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                          intermediate_size=2 * hidden, max_position_embeddings=SEQ_LEN + 2, num_labels=2)
    return HuggingFaceModel(model_class(config), use_logits=True)


class PrintSteps(Callback):
    """One JSON line per step: the step, the HiFT group trained, its units, the loss."""

    def fit_start(self, state: State, logger: Logger) -> None:
        del logger  # unused
        self.hift = next(c for c in state.callbacks if isinstance(c, HiFTCallback))

    def batch_end(self, state: State, logger: Logger) -> None:
        del logger  # unused
        step = int(state.timestamp.batch) - 1
        group = self.hift.group_at(step)
        units = [self.hift.units[u][0] for u in self.hift.units_trained_with(group)]
        print(json.dumps({"step": step, "group": group, "units": units, "loss": round(float(state.loss), 4)}))


def build_trainer(arch: str = "bert", steps: int = 64, layers: int = 2, group_element: int = 1,
                  strategy: str = "down2up", lr: float = 3e-3, seed: int = 0,
                  callbacks: Sequence[Callback] = ()) -> tuple[Trainer, HiFTCallback]:
    """The Trainer of this example, and its HiFT callback (whose ``units`` are known once it exists)."""
    model = build_model(arch, layers, seed=seed)
    hift = HiFTCallback(group_element=group_element, strategy=strategy, seed=seed)
    trainer = Trainer(model=model, train_dataloader=DataLoader(MarkerTask(seed=seed), batch_size=16, shuffle=True),
                      optimizers=DecoupledAdamW(model.parameters(), lr=lr, weight_decay=0.0),
                      max_duration=f"{steps}ba", callbacks=[hift, *callbacks], device="cpu", precision="fp32",
                      seed=seed, progress_bar=False, log_to_console=False)
    return trainer, hift


@cli_errors(ValueError)  # HiFT's refusals (a group_element larger than the units) name the setting
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="bert")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--group-element", type=int, default=1)
    parser.add_argument("--strategy", choices=STRATEGIES, default="down2up")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.layers < 1:
        parser.error("--steps and --layers must be positive")
    trainer, hift = build_trainer(args.arch, args.steps, args.layers, args.group_element, args.strategy, args.lr,
                                  args.seed, callbacks=[PrintSteps()])
    print(json.dumps({"units": {name: len(params) for name, params in hift.units}, "groups": hift.groups}))
    trainer.fit()
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
