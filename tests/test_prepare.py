"""prepare_dataset packs exactly, splits by document, is deterministic and atomic; the demo data builds offline."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from llmhift.datasets import prepare
from llmhift.datasets.demo_data import EOS_TOKEN, build_demo_data, train_tokenizer
from llmhift.datasets.prepare import PrepareError, iter_mds_samples, main, prepare_dataset, read_documents

L = 16  # short samples: many per document, so packing boundaries are exercised often
WORDS = "the model prunes heads layers masks while data streams mix domains over steps".split()


def _doc(domain: str, i: int, rng: random.Random) -> str:
    # A unique marker word per document, and always well over L tokens so that every document
    # starts inside the written stream (only a tail of < L tokens is dropped).
    return f"mark{domain}{i:03d} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two domains: a jsonl file, and a folder of .txt (blank-line blocks) and .jsonl files."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    alpha = [_doc("alpha", i, rng) for i in range(30)]
    alpha[7] += f" literal {EOS_TOKEN} inside text"  # must stay text, not become a boundary
    with (root / "alpha.jsonl").open("w") as f:
        for i, text in enumerate(alpha):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
            if i == 3:
                f.write(json.dumps({"text": "   "}) + "\n\n")  # empty document and blank line: skipped
    beta = [_doc("beta", i, rng) for i in range(24)]
    (root / "beta").mkdir()
    # Sorted order: a.txt, b/c.jsonl; the blocks of a.txt are separated by 1 or 2 blank lines.
    (root / "beta" / "a.txt").write_text("\n\n".join(beta[:6]) + "\n \n\n" + "\n\n".join(beta[6:12]) + "\n")
    (root / "beta" / "b").mkdir()
    (root / "beta" / "b" / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in beta[12:]))
    (root / "beta" / "ignored.md").write_text("not an input")
    tok_dir = root / "tokenizer"
    train_tokenizer(alpha + beta, tok_dir, vocab_size=300, model_max_length=L)
    return {
        "domains": {"alpha": root / "alpha.jsonl", "beta": root / "beta"},
        "docs": {"alpha": alpha, "beta": beta},
        "tokenizer": tok_dir,
    }


def _run(corpus: dict, out: Path, **kwargs) -> dict:
    settings = dict(max_seq_len=L, eval_fraction=0.2, seed=17) | kwargs
    return prepare_dataset(corpus["domains"], corpus["tokenizer"], out, **settings)


def _stream(folder: Path, domain: str) -> list[int]:
    stream: list[int] = []
    for sample in iter_mds_samples(folder):
        assert sample["domain"] == domain
        assert sample["tokens"].dtype == np.uint16 and sample["tokens"].shape == (L,)
        stream += sample["tokens"].tolist()
    return stream


def test_read_documents_txt_blocks_and_jsonl(corpus: dict) -> None:
    assert list(read_documents(corpus["domains"]["alpha"])) == corpus["docs"]["alpha"]
    assert list(read_documents(corpus["domains"]["beta"])) == corpus["docs"]["beta"]


def test_packing_is_exact_and_split_by_document(corpus: dict, tmp_path: Path) -> None:
    manifest = _run(corpus, tmp_path / "out")
    assert manifest == json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (tmp_path / "out" / manifest["tokenizer"]).resolve() == corpus["tokenizer"].resolve()
    tok = AutoTokenizer.from_pretrained(str(corpus["tokenizer"]))
    eos = tok.eos_token_id
    for domain, docs in corpus["docs"].items():
        enc = [tok(d, add_special_tokens=False, split_special_tokens=True)["input_ids"] for d in docs]
        assert all(eos not in ids for ids in enc)
        index = {tuple(ids): i for i, ids in enumerate(enc)}
        members = {}
        for split in prepare.SPLITS:
            stream = _stream(tmp_path / "out" / split / domain, domain)
            stats = manifest["splits"][split][domain]
            assert stats["samples"] * L == stats["tokens"] == len(stream) > 0
            assert 0 <= stats["dropped_tokens"] < L
            # Cut at EOS: whole documents, then a prefix of the document the dropped tail cut.
            *whole, last = np.split(np.array(stream), np.flatnonzero(np.array(stream) == eos) + 1)
            ids = [index[tuple(piece[:-1].tolist())] for piece in whole]
            assert ids == sorted(ids)  # source order
            if len(last):
                tail = [i for i, e in enumerate(enc) if i > ids[-1] and e[: len(last)] == last.tolist()]
                ids.append(tail[0])
            members[split] = ids
            assert stats["documents"] == len(ids)
            # The stream is the members' tokens, each followed by EOS, cut after the last full sample.
            expected = [t for i in ids for t in enc[i] + [eos]]
            assert stream == expected[: len(stream)]
            assert len(expected) - len(stream) == stats["dropped_tokens"]
        assert not set(members["train"]) & set(members["eval"])
        assert sorted(members["train"] + members["eval"]) == list(range(len(docs)))
        assert len(members["eval"]) == round(0.2 * len(docs))
        # Every token of every document, plus one EOS each, is written or in a dropped tail (< L).
        per_split = [manifest["splits"][split][domain] for split in prepare.SPLITS]
        assert sum(len(ids) + 1 for ids in enc) == sum(s["tokens"] + s["dropped_tokens"] for s in per_split)
        # The same seen as text: no marker word is in both splits.
        text = {s: tok.decode(_stream(tmp_path / "out" / s / domain, domain)) for s in prepare.SPLITS}
        for i in range(len(docs)):
            assert sum(f"mark{domain}{i:03d} " in text[s] for s in prepare.SPLITS) <= 1


def test_deterministic_and_seeded(corpus: dict, tmp_path: Path) -> None:
    for name in ("a", "b"):
        _run(corpus, tmp_path / name)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert any(f.suffix == ".mds" for f in files)
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    other = _run(corpus, tmp_path / "c", seed=18)
    assert (tmp_path / "c" / "eval" / "alpha" / "shard.00000.mds").read_bytes() != (
        tmp_path / "a" / "eval" / "alpha" / "shard.00000.mds"
    ).read_bytes()
    assert other["splits"]["eval"]["alpha"]["documents"] == 6


def test_refuses_non_empty_output_unless_overwrite(corpus: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--overwrite replaces a previous prepare output, never a folder that prepare did not write."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = ["--tokenizer", str(corpus["tokenizer"]), "--out", str(out), "--max-seq-len", str(L)]
    args += [f"{d}={p}" for d, p in corpus["domains"].items()]
    assert main([*args, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(out) in err and "not written by" in err and err.count("\n") == 1
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    assert main(args) == 0  # an empty folder is free
    capsys.readouterr()  # drop its progress bars
    with pytest.raises(FileExistsError, match="--overwrite"):
        _run(corpus, out)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(out) in err and "--overwrite" in err and err.count("\n") == 1
    assert main([*args, "--overwrite"]) == 0
    assert (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old folder left beside it


def test_bad_inputs_name_the_file_and_line(corpus: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"body": "no text field"}\n')
    with pytest.raises(PrepareError, match=rf"{bad}:3: no field 'text' \(found: body\)"):
        prepare_dataset({"bad": bad}, corpus["tokenizer"], tmp_path / "out")
    capsys.readouterr()  # drop the progress bar of the run above
    tok = ["--tokenizer", str(corpus["tokenizer"]), "--out", str(tmp_path / "out")]
    for args, needle in [
        ([*tok, f"x={tmp_path / 'missing.jsonl'}"], "missing.jsonl"),
        (["--tokenizer", str(tmp_path / "no-tok"), "--out", str(tmp_path / "out"), f"x={bad}"], "no-tok"),
        ([*tok, "--text-field", "body", f"x={bad}"], f"{bad}:1"),
        ([*tok, "no-equals-sign"], "DOMAIN=PATH"),
        ([*tok, "--eval-fraction", "0", f"x={bad}"], "eval_fraction"),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err  # progress bars may precede the one error line
        assert err.splitlines()[-1].startswith("error: ") and needle in err.splitlines()[-1], err
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_crash_midway_leaves_no_output(corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _run(corpus, tmp_path / "old")
    before = {p: p.read_bytes() for p in (tmp_path / "old").rglob("*") if p.is_file()}
    calls = 0
    real_add = prepare._Packer.add

    def add_then_crash(self: prepare._Packer, ids: list[int]) -> None:
        nonlocal calls
        calls += 1
        if calls == 40:  # past the first domain: shards of a whole domain are already on disk
            raise RuntimeError("simulated crash")
        real_add(self, ids)

    monkeypatch.setattr(prepare._Packer, "add", add_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(corpus, tmp_path / "new")
    calls = 0
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(corpus, tmp_path / "old", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert before == {p: p.read_bytes() for p in (tmp_path / "old").rglob("*") if p.is_file()}


def test_demo_data_builds_offline_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "demo"
    assert build_demo_data(out) == out
    manifest = json.loads((out / "mds" / "manifest.json").read_text())
    assert manifest["tokenizer"] == "../tokenizer" and manifest["max_seq_len"] == 128
    domains = set(manifest["splits"]["train"])
    assert len(domains) >= 4 and domains == set(manifest["splits"]["eval"])
    for split in prepare.SPLITS:
        for domain in domains:
            assert manifest["splits"][split][domain]["samples"] > 0, (split, domain)
            assert (out / "raw" / f"{domain}.jsonl").is_file()
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tok.eos_token == EOS_TOKEN and tok.eos_token_id == manifest["eos_token_id"]
    assert len(tok) == manifest["vocab_size"] <= 2048

    # The consumer's path: StreamingDataset (unique local path -> its own /dev/shm segments).
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(out / "mds" / "eval" / "code"), shuffle=False, batch_size=1)
    sample = ds[0]
    assert len(ds) == manifest["splits"]["eval"]["code"]["samples"]
    assert sample["domain"] == "code" and sample["tokens"].shape == (128,)
    assert not sample["tokens"].flags.writeable  # read-only: datasets must copy before collating
    assert "\n" in tok.decode(sample["tokens"])

    stamp = (out / "demo.json").stat().st_mtime_ns
    start = time.perf_counter()
    assert build_demo_data(out) == out
    assert time.perf_counter() - start < 0.5
    assert (out / "demo.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="overwrite"):
        build_demo_data(out, max_seq_len=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
