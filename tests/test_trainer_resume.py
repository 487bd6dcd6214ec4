"""A real Composer fit of ComposerLlama on CPU: it trains, checkpoints, and resumes exactly after a crash."""

import pytest
import torch
from composer import Callback, Trainer
from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW
from composer.utils import dist
from torch.utils.data import DataLoader, Dataset

from llmhift.convert.composer_to_hf import save_composer_to_hf
from llmhift.models.llama import ComposerLlama
from tests.helpers import CrashAt

MODEL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, max_seq_len=16)


class RepeatingTokens(Dataset):
    """Sequences with a learnable pattern (a short random cycle), so the loss really falls."""

    def __init__(self, n: int = 64, seq_len: int = 16, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, 64, (n, 1), generator=generator)
        steps = torch.randint(1, 4, (n, 1), generator=generator)
        self.tokens = (starts + steps * torch.arange(seq_len)) % 64

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i]}


class RecordLoss(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def batch_end(self, state, logger) -> None:
        self.losses[int(state.timestamp.batch)] = float(state.loss)



def make_trainer(save_folder, callbacks, autoresume=False, max_duration="8ba"):
    torch.manual_seed(0)
    model = ComposerLlama(MODEL)
    dataset = RepeatingTokens()
    loader = DataLoader(dataset, batch_size=8, sampler=dist.get_sampler(dataset, shuffle=True, seed=3))
    optimizer = DecoupledAdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    return Trainer(
        model=model,
        train_dataloader=loader,
        optimizers=optimizer,
        schedulers=CosineAnnealingWithWarmupScheduler(t_warmup="2ba", alpha_f=0.1),
        max_duration=max_duration,
        device="cpu",
        precision="fp32",
        seed=17,
        run_name="resume-test",
        save_folder=str(save_folder),
        save_interval="2ba",
        autoresume=autoresume,
        callbacks=callbacks,
        progress_bar=False,
        log_to_console=False,
    )


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted(tmp_path):
    full = RecordLoss()
    make_trainer(tmp_path / "full", [full]).fit()
    assert sorted(full.losses) == list(range(1, 9))
    assert full.losses[8] < full.losses[1] - 0.3, full.losses

    first = RecordLoss()
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "crashed", [first, CrashAt(5)], autoresume=True).fit()
    assert sorted(first.losses) == [1, 2, 3, 4, 5]

    resumed = RecordLoss()
    trainer = make_trainer(tmp_path / "crashed", [resumed], autoresume=True)
    assert int(trainer.state.timestamp.batch) == 4  # the last checkpoint, not a fresh start
    trainer.fit()
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    for batch in range(1, 6):
        assert first.losses[batch] == full.losses[batch], batch
    for batch in range(5, 9):
        assert resumed.losses[batch] == full.losses[batch], batch

    # The uninterrupted and the resumed run end with the same weights, and Composer's own
    # checkpoint converts to HF without any hand-written config.
    full_pt, resumed_pt = tmp_path / "full" / "latest-rank0.pt", tmp_path / "crashed" / "latest-rank0.pt"
    a = torch.load(full_pt, weights_only=False)["state"]["model"]
    b = torch.load(resumed_pt, weights_only=False)["state"]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    out = save_composer_to_hf(resumed_pt, tmp_path / "hf", n_heads=4)
    assert (out / "model.safetensors").is_file()
