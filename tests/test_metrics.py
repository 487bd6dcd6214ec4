"""Per-domain cross-entropy: exact per-domain values, token weighting, empty domains, ranks, Composer eval."""

from __future__ import annotations

import datetime
import doctest
import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from composer import Trainer
from composer.loggers import InMemoryLogger
from torch.utils.data import DataLoader

from llmhift.models import metrics as metrics_module
from llmhift.models.causal_lm import IGNORE_INDEX, eval_metrics, next_token_targets
from llmhift.models.llama import ComposerLlama
from llmhift.models.metrics import DomainCrossEntropy, domain_metrics, update_llm_metric

V = 11  # vocabulary of the synthetic batches


def make_batch(seed: int, domain_idx: list[int], seq_len: int = 6, ignore_frac: float = 0.3):
    """Random logits and next-token targets with some positions ignored, as the metric receives them."""
    gen = torch.Generator().manual_seed(seed)
    B = len(domain_idx)
    logits = torch.randn(B, seq_len, V, generator=gen) * 3  # (B, T, V)
    targets = torch.randint(V, (B, seq_len), generator=gen)  # (B, T)
    targets[torch.rand(B, seq_len, generator=gen) < ignore_frac] = IGNORE_INDEX
    return logits, targets, torch.tensor(domain_idx)


def reference_loss(batches, domain: int) -> torch.Tensor:
    """Mean cross-entropy over exactly this domain's non-ignored tokens of all batches together."""
    logits = torch.cat([b[0][b[2] == domain] for b in batches])  # (n, T, V)
    targets = torch.cat([b[1][b[2] == domain] for b in batches])  # (n, T)
    return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def updated(domain: int, batches) -> DomainCrossEntropy:
    metric = DomainCrossEntropy(domain, f"d{domain}")
    for logits, targets, domain_idx in batches:
        metric.update(logits, targets, domain_idx)
    return metric


def test_one_batch_equals_cross_entropy_over_the_domain_tokens():
    batch = make_batch(0, [0, 1, 0, 1, 1, 0])
    assert (batch[1] == IGNORE_INDEX).any()
    for domain in (0, 1):
        metric = updated(domain, [batch])
        expected = reference_loss([batch], domain)
        assert abs(metric.compute().item() - expected.item()) < 1e-6
        rows = batch[2] == domain
        assert metric.total_tokens.item() == (batch[1][rows] != IGNORE_INDEX).sum().item()


def test_accumulation_is_token_weighted_not_a_mean_of_batch_means():
    # Different batch sizes, domain mixes and ignore rates give each batch a different token count.
    batches = [
        make_batch(1, [0, 1, 1], ignore_frac=0.1),
        make_batch(2, [0, 0, 0, 0, 1], ignore_frac=0.6),
        make_batch(3, [1, 0], seq_len=6, ignore_frac=0.0),
    ]
    for domain in (0, 1):
        value = updated(domain, batches).compute().item()
        assert abs(value - reference_loss(batches, domain).item()) < 1e-6
        batch_means = [reference_loss([b], domain).item() for b in batches]
        assert abs(value - sum(batch_means) / len(batch_means)) > 1e-3  # the test can tell them apart


def test_batch_without_the_domain_changes_nothing_and_never_gives_nan():
    with_domain = make_batch(4, [0, 1, 0])
    without = make_batch(5, [1, 1, 1, 1])
    metric = updated(0, [with_domain])
    sum_loss, tokens = metric.sum_loss.clone(), metric.total_tokens.clone()
    metric.update(*without)
    assert torch.equal(metric.sum_loss, sum_loss) and torch.equal(metric.total_tokens, tokens)
    assert torch.isfinite(metric.sum_loss)
    assert abs(metric.compute().item() - reference_loss([with_domain], 0).item()) < 1e-6


def test_domain_never_seen_gives_nan_warns_once_and_has_no_data():
    metric = DomainCrossEntropy(2, "math")
    metric.update(*make_batch(6, [0, 1, 1]))
    with pytest.warns(UserWarning, match="'math'") as record:
        value = metric.compute()
    assert torch.isnan(value)  # no value, never a 0.0 that reads as a perfect loss
    assert metric.total_tokens.item() == 0 and metric.sum_loss.item() == 0.0
    assert not metric.has_data()
    # The warning points at the caller of compute(), not at torchmetrics' wrapper.
    assert [os.path.basename(w.filename) for w in record if "math" in str(w.message)] == ["test_metrics.py"]
    metric.update(*make_batch(7, [1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once is enough: a second compute stays quiet
        assert torch.isnan(metric.compute())


def test_all_targets_ignored_counts_as_no_data():
    logits, targets, domain_idx = make_batch(8, [0, 0])
    targets[:] = IGNORE_INDEX
    metric = updated(0, [(logits, targets, domain_idx)])
    assert not metric.has_data()
    with pytest.warns(UserWarning, match="'d0'"):
        assert torch.isnan(metric.compute())


def test_bad_shapes_and_duplicate_domains_are_refused():
    logits, targets, domain_idx = make_batch(9, [0, 1])
    with pytest.raises(ValueError, match=r"domain_idx \(B,\)"):
        DomainCrossEntropy(0, "web").update(logits, targets, domain_idx[:1])
    with pytest.raises(ValueError, match=r"repeated: \['web'\]"):
        domain_metrics(["web", "code", "web"])


def test_domain_metrics_names_and_indices():
    built = domain_metrics(["web", "code"])
    assert list(built) == ["web_LanguageCrossEntropy", "code_LanguageCrossEntropy"]
    assert [(m.domain_idx, m.domain) for m in built.values()] == [(0, "web"), (1, "code")]


def test_update_llm_metric_routes_domain_idx_and_names_a_missing_one():
    logits, _, domain_idx = make_batch(10, [0, 1, 1])
    input_ids = torch.randint(V, (3, 6))
    batch = {"input_ids": input_ids, "domain_idx": domain_idx}
    per_domain = domain_metrics(["web", "code"])
    overall = eval_metrics()["LanguageCrossEntropy"]
    for metric in [*per_domain.values(), overall]:
        update_llm_metric(metric, batch, logits)
    targets = next_token_targets(batch)
    expected = reference_loss([(logits, targets, domain_idx)], 1)
    assert abs(per_domain["code_LanguageCrossEntropy"].compute().item() - expected.item()) < 1e-6
    assert abs(overall.compute().item() - F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)).item()) < 1e-6
    with pytest.raises(KeyError, match="must yield domain_idx"):
        update_llm_metric(per_domain["web_LanguageCrossEntropy"], {"input_ids": input_ids}, logits)


def test_docstring_example_runs():
    # every one of the 4 example lines ran and passed: deleting the example fails here too
    assert doctest.testmod(metrics_module) == doctest.TestResults(failed=0, attempted=4)


# --- distributed: sums and counts are reduced across ranks before the division ---------------------

DIST_DOMAINS = ["web", "code", "math"]  # math appears on no rank


def rank_batches(rank: int):
    if rank == 0:
        return [make_batch(20, [0, 1, 0, 0]), make_batch(21, [1, 0], ignore_frac=0.6)]
    # Rank 1 holds no sample of domain 0 and a different number of domain-1 tokens than rank 0.
    return [make_batch(22, [1, 1, 1]), make_batch(23, [1], ignore_frac=0.0), make_batch(24, [1, 1])]


def _dist_worker(rank: int, world_size: int, out_dir: str) -> None:
    # A file rendezvous: no port to pick, so no collision with another job's store on this machine.
    store = os.path.join(out_dir, "rendezvous")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    built = domain_metrics(DIST_DOMAINS)
    for logits, targets, domain_idx in rank_batches(rank):
        for metric in built.values():
            metric.update(logits, targets, domain_idx)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        values = {name: metric.compute().item() for name, metric in built.items()}
    result = {
        "values": values,
        "has_data": {name: metric.has_data() for name, metric in built.items()},
        # compute() restores the rank's own states afterwards, so accumulation could go on.
        "local_tokens": {name: metric.total_tokens.item() for name, metric in built.items()},
    }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    # Both ranks past every collective before either tears down: destroying a gloo group while
    # the other rank may still be in one hangs now and then (pytorch/pytorch#75097).
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_give_the_single_process_value(tmp_path):
    mp.spawn(_dist_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    every_batch = rank_batches(0) + rank_batches(1)
    for domain, name in enumerate(DIST_DOMAINS):
        key = f"{name}_LanguageCrossEntropy"
        single = updated(domain, every_batch)  # one process, all the data
        for rank, result in enumerate(results):
            if name == "math":
                assert math.isnan(result["values"][key]) and result["has_data"][key] is False
            else:
                assert abs(result["values"][key] - reference_loss(every_batch, domain).item()) < 1e-6
                assert abs(result["values"][key] - single.compute().item()) < 1e-6
                assert result["has_data"][key] is True
            local = updated(domain, rank_batches(rank)).total_tokens.item()
            assert result["local_tokens"][key] == local
    assert results[1]["local_tokens"]["web_LanguageCrossEntropy"] == 0  # rank 1 never saw domain 0


# --- a real Composer eval ----------------------------------------------------------------------------

COMPOSER_DOMAINS = ["web", "code", "math"]  # no eval sample is math


class DomainLlama(ComposerLlama):
    """ComposerLlama with per-domain eval metrics wired in the way the docstring of update_llm_metric shows."""

    def get_metrics(self, is_train: bool = False):
        return {} if is_train else {**eval_metrics(), **domain_metrics(COMPOSER_DOMAINS)}

    def update_metric(self, batch, outputs, metric):
        update_llm_metric(metric, batch, outputs)


def test_composer_eval_logs_per_domain_losses_equal_to_a_direct_computation():
    torch.manual_seed(0)
    model = DomainLlama(dict(vocab_size=64, d_model=32, n_layers=1, n_heads=4, intermediate_size=64))
    domains = [0, 1, 0, 0, 1, 1, 0, 1, 0, 0]  # 10 samples in batches of 4: the last batch has 2
    samples = [
        {"input_ids": torch.randint(64, (12,)), "domain_idx": torch.tensor(d)} for d in domains
    ]
    logger = InMemoryLogger()
    trainer = Trainer(
        model=model,
        eval_dataloader=DataLoader(samples, batch_size=4),
        device="cpu",
        loggers=[logger],
        progress_bar=False,
    )
    with pytest.warns(UserWarning, match="'math'"):
        trainer.eval()

    with torch.no_grad():
        batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        logits = model.model(batch["input_ids"])  # (10, 12, 64)
        targets = next_token_targets(batch)  # (10, 12)
    flat = logits.reshape(-1, 64), targets.reshape(-1)
    assert abs(trainer.state.eval_metric_values["LanguageCrossEntropy"].item() - F.cross_entropy(*flat).item()) < 1e-6
    for domain, name in enumerate(COMPOSER_DOMAINS):
        key = f"{name}_LanguageCrossEntropy"
        rows = batch["domain_idx"] == domain
        logged = logger.data[f"metrics/eval/{key}"][-1][1].item()  # Composer's key: metrics/<eval label>/<key>
        if not rows.any():  # math: no value at all, where a 0.0 would read as a perfect loss
            assert math.isnan(trainer.state.eval_metric_values[key].item()) and math.isnan(logged)
            continue
        expected = F.cross_entropy(logits[rows].reshape(-1, 64), targets[rows].reshape(-1)).item()
        assert abs(trainer.state.eval_metric_values[key].item() - expected) < 1e-6
        assert abs(logged - expected) < 1e-6
    assert not trainer.state.eval_metrics["eval"]["math_LanguageCrossEntropy"].has_data()
    assert trainer.state.eval_metrics["eval"]["code_LanguageCrossEntropy"].has_data()
