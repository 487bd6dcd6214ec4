"""The embedded demo corpus and tokenizer, built offline from text that every CPython install ships.

Usage::

    python -m llmhift.datasets.demo_data OUT_DIR [--max-seq-len 128] [--vocab-size 2048] [--overwrite]

Four domains of clearly different text, all taken from the running interpreter's standard library
(never downloaded; the stdlib ``test`` package is not used, since distros strip it):

==========  ===========================================================================
domain      one document per
==========  ===========================================================================
code        stdlib module source file of at most 16 KB (sorted paths; tests, idlelib,
            turtledemo and site-packages excluded)
docs        module / class / function docstring of at least 120 characters (``ast``)
reference   ~1500-character chunk of the Language Reference in ``pydoc_data.topics``
            (where a distro strips ``pydoc_data``: of pydoc's plain-text help on builtins)
data        block of 64 code points of the Unicode character table (``unicodedata``)
==========  ===========================================================================

Each domain is capped in characters so that the build takes seconds on 2 CPU cores. The text,
and so the corpus, differs between Python versions but is fixed for one interpreter.

Layout of OUT_DIR::

    tokenizer/            byte-level BPE, a PreTrainedTokenizerFast folder; <|endoftext|> is
                          BOS, EOS and PAD (AutoTokenizer.from_pretrained(...) works offline)
    raw/<domain>.jsonl    the documents: {"text": ..., "source": ...}
    mds/                  prepare_dataset output: mds/{train,eval}/<domain>/ and manifest.json
    demo.json             written last: the settings and document counts; marks a complete build
"""

from __future__ import annotations

import argparse
import ast
import builtins
import json
import pydoc
import re
import sys
import sysconfig
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from llmhift.atomic import atomic_directory
from llmhift.datasets.prepare import MANIFEST_NAME, SPLITS, prepare_dataset
from llmhift.errors import cli_errors

__all__ = ["DOMAINS", "EOS_TOKEN", "MARKER_NAME", "build_demo_data", "ensure_demo_data", "main", "train_tokenizer"]

EOS_TOKEN = "<|endoftext|>"
MARKER_NAME = "demo.json"
COMMAND = "llmhift.datasets.demo_data"  # the marker of its output folders: --overwrite replaces only those

_MAX_SOURCE_BYTES = 16_000  # one module per document: keep documents a few thousand tokens long
_MIN_DOCSTRING_CHARS = 120  # shorter docstrings are one-liners that say little
_CHUNK_CHARS = 1500
_CODEPOINTS_PER_DOC = 64
# Names made by a rule, not written: "CJK UNIFIED IDEOGRAPH-4E00", "HANGUL SYLLABLE GA" (11172 of them).
_GENERATED_NAME = re.compile(r"-[0-9A-F]{4,6}$|^HANGUL SYLLABLE ")
_SKIP_DIRS = {"site-packages", "dist-packages", "idlelib", "turtledemo"}

Document = dict[str, str]  # {"text": ..., "source": ...}


def _stdlib_sources() -> list[tuple[str, Path]]:
    """The stdlib's .py files as (relative posix path, path), sorted: the same list on every run."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        # Test folders hold deliberately broken files (lib2to3's Python 2 grammar samples).
        if any(part in _SKIP_DIRS or "test" in part for part in rel.parts[:-1]):
            continue
        files.append((rel.as_posix(), path))
    return sorted(files)


def _read_source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _capped(docs: Iterable[Document], max_chars: int) -> list[Document]:
    out, total = [], 0
    for doc in docs:
        if total >= max_chars:
            break
        out.append(doc)
        total += len(doc["text"])
    return out


def _chunks(text: str, source: str) -> Iterable[Document]:
    """Paragraphs joined into documents of about ``_CHUNK_CHARS``: a topic is too long, a paragraph too short."""
    parts: list[str] = []
    size = 0
    for para in re.split(r"\n\s*\n", text):
        if para.strip():
            parts.append(para.rstrip())
            size += len(parts[-1])
        if size >= _CHUNK_CHARS:
            yield {"text": "\n\n".join(parts), "source": source}
            parts, size = [], 0
    if parts:
        yield {"text": "\n\n".join(parts), "source": source}


def _code_documents() -> Iterable[Document]:
    for rel, path in _stdlib_sources():
        if path.stat().st_size <= _MAX_SOURCE_BYTES and (text := _read_source(path)) and text.strip():
            yield {"text": text, "source": rel}


def _docs_documents() -> Iterable[Document]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for rel, path in _stdlib_sources():
        text = _read_source(path)
        try:
            tree = ast.parse(text or "")
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, kinds) and len(doc := ast.get_docstring(node) or "") >= _MIN_DOCSTRING_CHARS:
                yield {"text": doc, "source": f"{rel}:{getattr(node, 'name', '<module>')}"}


def _reference_documents() -> Iterable[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # stripped by some distros; pydoc itself always ships
        yield from _chunks(pydoc.plaintext.document(builtins), "pydoc builtins")
        return
    for name in sorted(topics):
        yield from _chunks(topics[name], f"pydoc_data.topics[{name!r}]")


def _data_documents() -> Iterable[Document]:
    for start in range(0, sys.maxunicode + 1, _CODEPOINTS_PER_DOC):
        rows = []
        for cp in range(start, start + _CODEPOINTS_PER_DOC):
            ch = chr(cp)
            name = unicodedata.name(ch, "")
            if name and not _GENERATED_NAME.search(name):
                fields = (unicodedata.category(ch), unicodedata.bidirectional(ch), unicodedata.decomposition(ch))
                rows.append(f"U+{cp:04X}\t{name}\t" + "\t".join(fields).rstrip())
        if rows:
            yield {"text": "\n".join(rows), "source": f"unicodedata U+{start:04X}"}


# name -> (documents, character cap); caps keep the build at a few seconds and ~1.5M tokens.
DOMAINS: dict[str, tuple[Callable[[], Iterable[Document]], int]] = {
    "code": (_code_documents, 2_000_000),
    "docs": (_docs_documents, 1_000_000),
    "reference": (_reference_documents, 600_000),
    "data": (_data_documents, 800_000),
}


def train_tokenizer(
    texts: Iterable[str], out_dir: Path | str, vocab_size: int = 2048, model_max_length: int = 128
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and save it as a ``PreTrainedTokenizerFast`` folder.

    Byte-level: any text encodes without an unknown token. ``<|endoftext|>`` is the one special
    token and serves as BOS, EOS and PAD, as in GPT-2; packing puts it between documents.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def _read_marker(out_dir: Path) -> dict | None:
    marker = out_dir / MARKER_NAME
    return json.loads(marker.read_text()) if marker.is_file() else None


def _check_marker(out_dir: Path, marker: dict, max_seq_len: int, vocab_size: int) -> Path:
    wanted = {"max_seq_len": max_seq_len, "vocab_size": vocab_size}
    built = {key: marker.get(key) for key in wanted}
    if built != wanted:
        raise ValueError(
            f"demo data in {out_dir} was built with {built}, not {wanted}; "
            "pass overwrite=True (--overwrite) or choose another folder"
        )
    return out_dir


def build_demo_data(
    out_dir: Path | str, max_seq_len: int = 128, vocab_size: int = 2048, overwrite: bool = False
) -> Path:
    """Build the demo tokenizer, raw text and MDS shards into ``out_dir``; return ``out_dir``.

    Idempotent: a complete ``out_dir`` (its ``demo.json`` exists) is returned at once, unless
    ``overwrite``. Atomic: everything is built in a temp folder beside ``out_dir`` and renamed into
    place, so a run cut short never leaves a folder that looks complete. When several processes
    (ranks) build at once, the first rename wins and the others keep its result.
    """
    out_dir = Path(out_dir)
    if not overwrite and (marker := _read_marker(out_dir)) is not None:
        return _check_marker(out_dir, marker, max_seq_len, vocab_size)
    try:
        # Its input is the interpreter's standard library. A folder built before output markers
        # existed is recognised by demo.json, which only this function writes, and last.
        with atomic_directory(out_dir, overwrite, command=COMMAND, inputs=[sysconfig.get_paths()["stdlib"]],
                              own=lambda folder: _read_marker(folder) is not None) as tmp:
            corpus = {
                name: _capped(documents(), max_chars)
                for name, (documents, max_chars) in tqdm(DOMAINS.items(), desc="collect demo text", unit="domain")
            }
            (tmp / "raw").mkdir()
            for name, docs in corpus.items():
                with (tmp / "raw" / f"{name}.jsonl").open("w", encoding="utf-8") as f:
                    f.writelines(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)
            texts = [doc["text"] for docs in corpus.values() for doc in docs]
            train_tokenizer(texts, tmp / "tokenizer", vocab_size, max_seq_len)
            prepare_dataset(
                {name: tmp / "raw" / f"{name}.jsonl" for name in DOMAINS},
                tokenizer_dir=tmp / "tokenizer",
                out=tmp / "mds",
                max_seq_len=max_seq_len,
            )
            marker = {
                "max_seq_len": max_seq_len,
                "vocab_size": vocab_size,
                "documents": {name: len(docs) for name, docs in corpus.items()},
                "python": sys.version.split()[0],
            }
            (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    except FileExistsError:
        if overwrite or (marker := _read_marker(out_dir)) is None:
            raise
        return _check_marker(out_dir, marker, max_seq_len, vocab_size)  # another rank finished first
    return out_dir


def ensure_demo_data(out_dir: Path | str, max_seq_len: int = 128, vocab_size: int = 2048) -> Path:
    """Build the demo data into ``out_dir`` if it is not there yet (what ``train.py`` calls)."""
    return build_demo_data(out_dir, max_seq_len=max_seq_len, vocab_size=vocab_size, overwrite=False)


@cli_errors(ValueError, OSError)
def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad input)."""
    parser = argparse.ArgumentParser(prog="python -m llmhift.datasets.demo_data", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to build into (created atomically)")
    parser.add_argument("--max-seq-len", type=int, default=128, help="tokens per sample (default 128)")
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size (default 2048)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if OUT_DIR is complete")
    args = parser.parse_args(argv)
    out_dir = build_demo_data(args.out_dir, args.max_seq_len, args.vocab_size, args.overwrite)
    manifest = json.loads((out_dir / "mds" / MANIFEST_NAME).read_text())
    for split in SPLITS:
        for name, stats in manifest["splits"][split].items():
            print(f"{split:<6} {name:<10} documents {stats['documents']:>6}  samples {stats['samples']:>7}")
    print(f"demo data ready in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
