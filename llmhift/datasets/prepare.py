"""Raw text / jsonl per domain -> tokenized, packed MDS shards in ``<out>/<split>/<domain>/``.

Usage::

    python -m llmhift.datasets.prepare --tokenizer TOK_DIR --out OUT [--max-seq-len 128] \\
        [--eval-fraction 0.05] [--text-field text] [--seed 17] [--overwrite] DOMAIN=PATH [DOMAIN=PATH ...]

Inputs. PATH is a ``.jsonl`` file (one JSON object per line, the text under ``--text-field``), a
``.txt`` file (one document per block of text separated by one or more blank lines: a single file
then still holds enough documents for a train/eval split; write jsonl to keep blank lines inside a
document), or a folder searched recursively for both, read in sorted path order. Empty documents are
skipped: an EOS alone teaches nothing.

Outputs. For split in ``train``, ``eval`` and every domain, an MDS folder whose samples hold:

=========  =========================  =========================================================
column     MDS encoding               value
=========  =========================  =========================================================
tokens     ``ndarray:uint16:<L>``     exactly ``L = max_seq_len`` token ids (``int32`` instead of
                                      ``uint16`` when the vocabulary exceeds 65536 entries)
domain     ``str``                    the domain name, equal to the folder name
=========  =========================  =========================================================

The dtype and shape live in the column encoding, so a reader gets a ``(L,)`` array back without
parsing anything (read-only: copy it, e.g. ``sample["tokens"].astype(np.int64)``). Read a folder
with ``streaming.StreamingDataset(local=...)`` / ``streaming.Stream(local=...)``, or in order with
:func:`iter_mds_samples`. ``<out>/manifest.json`` holds, per split and domain, ``documents``,
``samples``, ``tokens`` (written: samples x L) and ``dropped_tokens`` (the incomplete tail), plus
the settings; its paths are relative to ``out``.

Packing: every document's tokens followed by the tokenizer's EOS id, concatenated in source order,
cut into samples of exactly ``L`` tokens; the incomplete tail of each split/domain is dropped.
Splitting is by document, by a seeded permutation per domain, so train and eval never share a
document and the same inputs and seed give byte-identical shards. The whole set is written into a
temp folder beside ``out`` and renamed into place when complete (:mod:`llmhift.atomic`). An
``out`` that is, contains or lies inside an input is refused, and ``--overwrite`` replaces only a
previous output of this command (its hidden marker file), never a folder it did not write.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import zlib
from collections.abc import Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from streaming import MDSWriter
from streaming.base.format import reader_from_json
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llmhift.atomic import atomic_directory, check_destination, check_inputs
from llmhift.errors import UserError, cli_errors

__all__ = [
    "MANIFEST_NAME",
    "SPLITS",
    "PrepareError",
    "iter_mds_samples",
    "main",
    "prepare_dataset",
    "read_documents",
]

SPLITS = ("train", "eval")
MANIFEST_NAME = "manifest.json"
COMMAND = "llmhift.datasets.prepare"  # the marker of its output folders: --overwrite replaces only those

_SUFFIXES = (".jsonl", ".txt")
_DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a folder name that needs no quoting
_BLANK_LINES = re.compile(r"\n\s*\n")
_TOKENIZE_BATCH = 256  # documents per fast-tokenizer call: large enough for its Rust threads


class PrepareError(UserError, ValueError):
    """Bad input (settings, files, tokenizer); the CLI prints it as one ``error:`` line."""


def _input_files(path: Path) -> list[Path]:
    """The files a PATH argument stands for, in a fixed order so that runs are reproducible."""
    if path.is_file():
        if path.suffix not in _SUFFIXES:
            raise PrepareError(f"{path}: unsupported file type {path.suffix!r}; expected one of {_SUFFIXES}")
        return [path]
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix in _SUFFIXES),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise PrepareError(f"{path}: the folder holds no {' or '.join(_SUFFIXES)} file")
        return files
    raise FileNotFoundError(f"input path does not exist: {path}")


def _read_jsonl(file: Path, text_field: str) -> Iterator[str]:
    with file.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepareError(f"{file}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                found = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                raise PrepareError(
                    f"{file}:{lineno}: no field {text_field!r} (found: {found}); name the text field with --text-field"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise PrepareError(f"{file}:{lineno}: field {text_field!r} is a {type(text).__name__}, not a string")
            if text.strip():
                yield text


def _read_txt(file: Path) -> Iterator[str]:
    for block in _BLANK_LINES.split(file.read_text(encoding="utf-8")):
        text = block.strip("\n").rstrip()
        if text.strip():
            yield text


def read_documents(path: Path | str, text_field: str = "text") -> Iterator[str]:
    """Yield the non-empty documents of a ``.txt`` / ``.jsonl`` file or folder, in source order.

    A generator, so a corpus larger than memory streams through; errors name the file (and the line
    for jsonl).
    """
    for file in _input_files(Path(path)):
        try:
            yield from _read_jsonl(file, text_field) if file.suffix == ".jsonl" else _read_txt(file)
        except UnicodeDecodeError as e:
            raise PrepareError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _check_settings(domains: Mapping[str, Any], max_seq_len: int, eval_fraction: float, seed: int) -> None:
    if not domains:
        raise PrepareError("no domains given; pass DOMAIN=PATH at least once")
    for name in domains:
        if not isinstance(name, str) or not _DOMAIN_NAME.fullmatch(name):
            raise PrepareError(f"domain name {name!r} must match {_DOMAIN_NAME.pattern} (it names a folder)")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise PrepareError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    if not 0.0 < eval_fraction < 1.0:
        raise PrepareError(f"eval_fraction must lie strictly between 0 and 1, got {eval_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PrepareError(f"seed must be a non-negative integer, got {seed!r}")


# Files one of which every saved tokenizer has; without any, transformers fails deep inside its converter.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _load_tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"tokenizer folder does not exist: {tokenizer_dir}")
    if not any((tokenizer_dir / name).is_file() for name in TOKENIZER_FILES):
        raise PrepareError(f"--tokenizer {tokenizer_dir} holds none of {list(TOKENIZER_FILES)}; point it at a folder "
                           "written by tokenizer.save_pretrained()")
    try:
        # local_files_only: a folder name that looks like a Hub repo id must never trigger a download.
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError, AttributeError, TypeError) as e:  # transformers' types for a broken folder
        raise PrepareError(f"cannot load a tokenizer from {tokenizer_dir}: {e}") from None
    if tokenizer.eos_token_id is None:
        raise PrepareError(f"tokenizer {tokenizer_dir} has no eos_token; packing needs one between documents")
    return tokenizer


def _eval_mask(num_docs: int, eval_fraction: float, seed: int, domain: str) -> np.ndarray:
    """Which documents go to eval: ``round(n * eval_fraction)``, clamped so both splits get one.

    The permutation is seeded by ``(seed, domain)``, so adding or removing a domain leaves the
    other domains' splits unchanged.
    """
    num_eval = min(max(round(num_docs * eval_fraction), 1), num_docs - 1)
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
    mask = np.zeros(num_docs, dtype=bool)
    mask[rng.permutation(num_docs)[:num_eval]] = True
    return mask


class _Packer:
    """Concatenates documents, each followed by EOS, and writes every complete ``max_seq_len`` slice."""

    def __init__(self, writer: MDSWriter, domain: str, max_seq_len: int, eos_id: int, dtype: str) -> None:
        self.writer, self.domain, self.max_seq_len, self.eos_id, self.dtype = writer, domain, max_seq_len, eos_id, dtype
        self.buffer: list[int] = []
        self.documents = 0
        self.samples = 0

    def add(self, ids: list[int]) -> None:
        self.buffer.extend(ids)
        self.buffer.append(self.eos_id)
        self.documents += 1
        n = len(self.buffer) // self.max_seq_len
        if n:
            rows = np.asarray(self.buffer[: n * self.max_seq_len], dtype=self.dtype).reshape(n, self.max_seq_len)
            for row in rows:  # (L,)
                self.writer.write({"tokens": row, "domain": self.domain})
            del self.buffer[: n * self.max_seq_len]
            self.samples += n

    def stats(self) -> dict[str, int]:
        return {
            "documents": self.documents,
            "samples": self.samples,
            "tokens": self.samples * self.max_seq_len,
            "dropped_tokens": len(self.buffer),
        }


def _write_domain(
    root: Path,
    domain: str,
    source: Path,
    text_field: str,
    is_eval: np.ndarray,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    dtype: str,
) -> dict[str, dict[str, int]]:
    columns = {"tokens": f"ndarray:{dtype}:{max_seq_len}", "domain": "str"}
    docs = read_documents(source, text_field)
    with contextlib.ExitStack() as stack:
        packers = {
            split: _Packer(
                stack.enter_context(MDSWriter(out=str(root / split / domain), columns=columns)),
                domain,
                max_seq_len,
                tokenizer.eos_token_id,
                dtype,
            )
            for split in SPLITS
        }
        bar = stack.enter_context(tqdm(total=len(is_eval), desc=f"tokenize {domain}", unit="doc"))
        first = 0
        while batch := list(islice(docs, _TOKENIZE_BATCH)):
            # split_special_tokens: a document that contains the text "<|endoftext|>" must not
            # inject a fake document boundary.
            ids = tokenizer(batch, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
            for i, doc_ids in enumerate(ids, first):
                packers["eval" if is_eval[i] else "train"].add(doc_ids)
            first += len(batch)
            bar.update(len(batch))
    return {split: packer.stats() for split, packer in packers.items()}


def prepare_dataset(
    domains: Mapping[str, Path | str],
    tokenizer_dir: Path | str,
    out: Path | str,
    max_seq_len: int = 128,
    eval_fraction: float = 0.05,
    text_field: str = "text",
    seed: int = 17,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenize and pack every domain into ``<out>/<split>/<domain>/`` MDS folders; return the manifest.

    Every input is read once before anything is written, so a bad record fails fast and cheaply,
    and the document count needed for an exact split is known. Raises ``PrepareError`` on bad
    settings or records, also when a split/domain would hold no sample (fewer tokens than
    ``max_seq_len``): an empty folder would only fail later, inside training.
    """
    _check_settings(domains, max_seq_len, eval_fraction, seed)
    out, tokenizer_dir = Path(out), Path(tokenizer_dir)
    sources = {name: Path(path) for name, path in domains.items()}
    for source in sources.values():
        _input_files(source)
    inputs = [*sources.values(), tokenizer_dir]
    check_inputs(out, inputs)  # fail before the slow part, not after it
    check_destination(out, overwrite, COMMAND)
    tokenizer = _load_tokenizer(tokenizer_dir)
    dtype = "uint16" if len(tokenizer) <= 1 << 16 else "int32"

    num_docs = {}
    for name, source in sources.items():
        num_docs[name] = sum(1 for _ in tqdm(read_documents(source, text_field), desc=f"read {name}", unit="doc"))
        if num_docs[name] < 2:
            raise PrepareError(f"domain {name!r} ({source}) holds {num_docs[name]} document(s); a split needs 2")

    # Paths relative to `out` stay valid when `out` and its inputs move together, and are the same
    # whether written from the temp folder or not (both sit in the same parent).
    where = out.resolve()
    manifest: dict[str, Any] = {
        "tokenizer": os.path.relpath(tokenizer_dir.resolve(), where),
        "sources": {name: os.path.relpath(source.resolve(), where) for name, source in sources.items()},
        "eos_token_id": tokenizer.eos_token_id,
        "vocab_size": len(tokenizer),
        "max_seq_len": max_seq_len,
        "eval_fraction": eval_fraction,
        "seed": seed,
        "text_field": text_field,
        "columns": {"tokens": f"ndarray:{dtype}:{max_seq_len}", "domain": "str"},
        "splits": {split: {} for split in SPLITS},
    }
    with atomic_directory(out, overwrite, command=COMMAND, inputs=inputs) as tmp:
        for name, source in sources.items():
            is_eval = _eval_mask(num_docs[name], eval_fraction, seed, name)
            stats = _write_domain(tmp, name, source, text_field, is_eval, tokenizer, max_seq_len, dtype)
            for split in SPLITS:
                if stats[split]["samples"] == 0:
                    raise PrepareError(
                        f"domain {name!r} has no complete {split} sample: {stats[split]['dropped_tokens']} tokens "
                        f"< max_seq_len {max_seq_len}; add text, lower --max-seq-len or change --eval-fraction"
                    )
                manifest["splits"][split][name] = stats[split]
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def iter_mds_samples(folder: Path | str) -> Iterator[dict[str, Any]]:
    """Yield the samples of one MDS folder in order, straight from its shard files.

    Unlike ``StreamingDataset`` this sets up no shared memory in /dev/shm (whose segments are keyed
    by the folder path and outlive a crashed process), so it suits checks and tools.
    """
    folder = Path(folder)
    index = json.loads((folder / "index.json").read_text())
    for shard in index["shards"]:
        reader = reader_from_json(str(folder), None, shard)
        for i in range(reader.samples):
            yield reader.get_item(i)


def _parse_domains(args: list[str]) -> dict[str, str]:
    domains: dict[str, str] = {}
    for arg in args:
        name, sep, path = arg.partition("=")
        if not sep or not name or not path:
            raise PrepareError(f"expected DOMAIN=PATH, got {arg!r}")
        if name in domains:
            raise PrepareError(f"domain {name!r} given twice")
        domains[name] = path
    return domains


@cli_errors(ValueError, OSError)
def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad input, as argparse does)."""
    parser = argparse.ArgumentParser(
        prog="python -m llmhift.datasets.prepare",
        description="Tokenize text per domain into packed MDS shards: OUT/{train,eval}/DOMAIN/.",
    )
    parser.add_argument("--tokenizer", required=True, help="a local tokenizer folder (AutoTokenizer)")
    parser.add_argument("--out", required=True, help="output folder, replaced atomically")
    parser.add_argument("--max-seq-len", type=int, default=128, help="tokens per sample (default 128)")
    parser.add_argument("--eval-fraction", type=float, default=0.05, help="documents to eval (default 0.05)")
    parser.add_argument("--text-field", default="text", help="jsonl field holding the text (default text)")
    parser.add_argument("--seed", type=int, default=17, help="seed of the train/eval split (default 17)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous output of this command")
    parser.add_argument("domains", nargs="+", metavar="DOMAIN=PATH", help="a .txt/.jsonl file or a folder of them")
    args = parser.parse_args(argv)
    manifest = prepare_dataset(
        _parse_domains(args.domains),
        tokenizer_dir=args.tokenizer,
        out=args.out,
        max_seq_len=args.max_seq_len,
        eval_fraction=args.eval_fraction,
        text_field=args.text_field,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(f"{'split':<6} {'domain':<16} {'documents':>10} {'samples':>10} {'tokens':>12}")
    for split in SPLITS:
        for name, stats in manifest["splits"][split].items():
            print(f"{split:<6} {name:<16} {stats['documents']:>10} {stats['samples']:>10} {stats['tokens']:>12}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
