"""Import layers (DESIGN.md): a module imports only its own layer and the layers below it, plus the pairs
that must stay apart. Every import counts, lazy ones inside functions included, so the next break fails CI.
Also: the old documented paths (llmhift.utils.*, llmhift.builders) still work after the re-layout."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from llmhift.convert import compare_logits, composer_to_hf, post_pruning

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ["llmhift", "train.py", "scripts", "bench"]

# Top to bottom; a module belongs to the layer of its longest matching prefix.
LAYERS = [
    ("entry", ("train", "scripts", "bench", "llmhift.report", "llmhift.evaluate", "llmhift.utils", "llmhift.builders")),
    ("build", ("llmhift.build",)),
    ("callbacks/convert", ("llmhift.callbacks", "llmhift.convert")),
    ("datasets/checkpoint", ("llmhift.datasets", "llmhift.checkpoint")),
    ("models", ("llmhift.models",)),
    ("base", ("llmhift", "llmhift.atomic", "llmhift.errors", "llmhift.labels", "llmhift.loggers",
              "llmhift.mixture")),
]
# Importer prefix -> prefixes it may not import even where the layers would allow it.
APART = {
    "llmhift.datasets": ("llmhift.models", "llmhift.callbacks"),
    "llmhift.callbacks": ("llmhift.datasets", "llmhift.build", "llmhift.convert"),
    "llmhift.convert": ("llmhift.build", "llmhift.callbacks", "llmhift.datasets"),
    "train": ("llmhift.models", "llmhift.callbacks", "llmhift.datasets"),  # train.py goes through build
}
RANK = {prefix: rank for rank, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes}


def _match(module: str, prefixes) -> str | None:
    """The longest of ``prefixes`` that is ``module`` or a package holding it."""
    hits = [p for p in prefixes if module == p or module.startswith(p + ".")]
    return max(hits, key=len, default=None)


def _imports(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source``; ``from a import b`` yields ``a.b`` (b may be a module)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                package = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(package + ([base] if base else []))
            found += [(node.lineno, base if alias.name == "*" else f"{base}.{alias.name}") for alias in node.names]
    return found


def violations(source: str, path: str) -> list[str]:
    """``path:line: rule`` for each import of ``source`` (the file at ``path``, relative to the repo) that
    breaks a layer rule."""
    parts = list(Path(path).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    module = ".".join(parts[:-1] if is_package else parts)
    own = _match(module, RANK)
    problems = []
    for line, target in _imports(source, module, is_package):
        layer = _match(target, RANK)
        if own is None or layer is None:
            continue  # not llmhift's
        if RANK[layer] < RANK[own]:
            problems.append(f"{path}:{line}: {module} ({LAYERS[RANK[own]][0]}) imports {target} "
                            f"({LAYERS[RANK[layer]][0]}), a layer above it; layers top to bottom: "
                            + " -> ".join(name for name, _ in LAYERS))
        name = target.rpartition(".")[2]
        if name.startswith("_") and not name.startswith("__"):
            problems.append(f"{path}:{line}: {module} imports {target}, a private name of another module; "
                            "make it public where it is defined")
        importer = _match(module, APART)
        apart = _match(target, APART[importer]) if importer else None
        if apart:
            problems.append(f"{path}:{line}: {module} imports {target}, but {importer} imports no {apart}")
    return problems


def _checked_files() -> list[Path]:
    files = []
    for name in CHECKED:
        path = ROOT / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_every_import_follows_the_layers():
    files = _checked_files()
    assert len(files) > 40 and ROOT / "train.py" in files  # the walk really found the code
    problems = [p for f in files for p in violations(f.read_text(), str(f.relative_to(ROOT)))]
    assert not problems, "import layer rules broken:\n" + "\n".join(problems)


def test_a_planted_upward_import_is_named_with_file_line_and_rule():
    source = "import torch\n\n\ndef f():\n    from llmhift.callbacks.pruning import PruningCallback\n"
    assert violations(source, "llmhift/models/planted.py") == [
        "llmhift/models/planted.py:5: llmhift.models.planted (models) imports llmhift.callbacks.pruning."
        "PruningCallback (callbacks/convert), a layer above it; layers top to bottom: entry -> build -> "
        "callbacks/convert -> datasets/checkpoint -> models -> base"
    ]


@pytest.mark.parametrize(("path", "source", "expected"), [
    ("llmhift/datasets/planted.py", "from llmhift.models import causal_lm\n",
     "llmhift/datasets/planted.py:1: llmhift.datasets.planted imports llmhift.models.causal_lm, "
     "but llmhift.datasets imports no llmhift.models"),
    ("llmhift/callbacks/planted.py", "from ..datasets.text import find_domains\n",
     "llmhift/callbacks/planted.py:1: llmhift.callbacks.planted imports llmhift.datasets.text.find_domains, "
     "but llmhift.callbacks imports no llmhift.datasets"),
    ("train.py", "import llmhift.models.l0_module\n",
     "train.py:1: train imports llmhift.models.l0_module, but train imports no llmhift.models"),
])
def test_planted_imports_between_parts_kept_apart_are_named(path, source, expected):
    assert violations(source, path) == [expected]


def test_a_planted_private_import_is_named():
    assert violations("from llmhift.models.hf_causal_lm import _D_MODEL_NAMES\n", "llmhift/build/planted.py") == [
        "llmhift/build/planted.py:1: llmhift.build.planted imports llmhift.models.hf_causal_lm._D_MODEL_NAMES, "
        "a private name of another module; make it public where it is defined"
    ]


def test_downward_imports_pass():
    source = ("from llmhift.models.llama import ComposerLlama\nfrom llmhift.checkpoint.io import LLMHIFT_KEY\n"
              "from llmhift import errors\nfrom . import pruning\nimport torch\n")
    assert violations(source, "llmhift/callbacks/planted.py") == []


# The commands README documented under llmhift.utils before the re-layout, with a bad input for each.
OLD_COMMANDS = [
    ("llmhift.utils.composer_to_hf", composer_to_hf.main, ["save_composer_to_hf", "missing.pt", "out"]),
    ("llmhift.utils.post_pruning_processing", post_pruning.main, ["prune_and_save_model", "missing.pt"]),
    ("llmhift.utils.test_composer_hf_eq", compare_logits.main, ["missing_hf", "missing.pt"]),
]


@pytest.mark.parametrize(("old", "main", "args"), OLD_COMMANDS, ids=[old for old, _, _ in OLD_COMMANDS])
def test_old_command_paths_run_the_moved_commands(tmp_path, monkeypatch, capsys, old, main, args):
    monkeypatch.chdir(tmp_path)  # the relative paths name nothing there
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    run = subprocess.run([sys.executable, "-m", old, *args], capture_output=True, text=True, cwd=tmp_path)
    assert (run.returncode, run.stderr) == (2, error)


def test_old_builders_names_are_the_build_packages():
    from llmhift.build.parallel import average_gloo_fsdp2_gradients
    from llmhift.build.trainer import build_trainer
    from llmhift.builders import average_gloo_fsdp2_gradients as old_average
    from llmhift.builders import build_trainer as old_build

    assert (old_average, old_build) == (average_gloo_fsdp2_gradients, build_trainer)
