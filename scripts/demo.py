"""The smallest end-to-end run on CPU: demo data -> train a tiny LLaMA with Composer -> HF checkpoint.

    python scripts/demo.py [RUN_DIR]     # default demo_runs/

Builds the embedded demo corpus and tokenizer on first use, trains ComposerLlama on all demo domains
for a few hundred batches, converts the last checkpoint to a Hugging Face folder, checks that its
logits equal the Composer model's, and prints where everything is.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from composer import Trainer
from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW
from streaming import Stream, StreamingDataset
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from llmhift.datasets.demo_data import ensure_demo_data
from llmhift.models.llama import ComposerLlama
from llmhift.utils.composer_to_hf import save_composer_to_hf
from llmhift.utils.test_composer_hf_eq import max_logit_difference

DOMAINS = ("code", "docs", "reference", "data")


def token_batches(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.from_numpy(np.stack([s["tokens"].astype(np.int64) for s in samples]))}


def loader(mds: Path, split: str, batch_size: int) -> DataLoader:
    streams = [Stream(local=str(mds / split / domain)) for domain in DOMAINS]
    dataset = StreamingDataset(streams=streams, shuffle=split == "train", shuffle_seed=17, batch_size=batch_size)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=token_batches)


def main(run_dir: Path) -> None:
    data = ensure_demo_data(run_dir / "data")
    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    model = ComposerLlama(dict(vocab_size=len(tokenizer), d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                               intermediate_size=352, max_seq_len=128, tie_word_embeddings=True))
    trainer = Trainer(
        model=model,
        train_dataloader=loader(data / "mds", "train", 16),
        eval_dataloader=loader(data / "mds", "eval", 16),
        optimizers=DecoupledAdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0),
        schedulers=CosineAnnealingWithWarmupScheduler(t_warmup="20ba", alpha_f=0.1),
        max_duration="300ba",
        eval_interval="100ba",
        device="cpu",
        precision="fp32",
        seed=17,
        save_folder=str(run_dir / "checkpoints"),
        save_interval="100ba",
        save_overwrite=True,
    )
    trainer.fit()
    checkpoint = run_dir / "checkpoints" / "latest-rank0.pt"
    hf_dir = save_composer_to_hf(checkpoint, run_dir / "hf", tokenizer=data / "tokenizer", overwrite=True, n_heads=4)
    difference = max_logit_difference(str(hf_dir), str(checkpoint), overrides={"n_heads": 4})
    print(f"checkpoint: {checkpoint}\nHugging Face model: {hf_dir} (max logit difference {difference:.1e})")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_runs"))
