"""Faults against every offline writer (issue 13, parts 1, 2 for ENOSPC, and 7).

Each writer (prepare, demo_data, save_hf_to_composer, save_composer_to_hf, prune_and_save_model,
report, HiFT's offload_dir) is pointed at an output that is, contains, or lies inside one of its
inputs; the refusal must be one ``error:`` line naming both paths, the inputs byte-identical
afterwards, and the correct run right after it must succeed. Then: overwrite of a foreign output
refused and of the command's own output allowed, a full disk (simulated at the lowest write call,
and a real small tmpfs where root can mount one), the user's umask on exported files, and temp
outputs left by a killed run. One case per writer runs the real ``python -m`` command in a
subprocess; the others call the same ``main`` in this process (a subprocess costs ~4 s of imports).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import SafetensorError

from llmhift import report
from llmhift.atomic import MARKER_NAME, NoSpaceError, OutputError, atomic_directory
from llmhift.callbacks.hift import HiFTCallback
from llmhift.convert import composer_to_hf
from llmhift.convert import post_pruning as post_pruning_processing
from llmhift.datasets import demo_data, prepare
from tests.helpers import REPO_ROOT
from tests.test_composer_to_hf import save_tokenizer
from tests.test_hift import make_trainer
from tests.test_llama import tiny_hf_llama
from tests.test_pruning_equivalence import pruning_checkpoint

MODULES = {
    prepare.main: "llmhift.datasets.prepare",
    demo_data.main: "llmhift.datasets.demo_data",
    composer_to_hf.main: "llmhift.convert.composer_to_hf",
    post_pruning_processing.main: "llmhift.convert.post_pruning",
    report.main: "llmhift.report",
}
PRUNE_TARGET = {"d_model": 24, "n_kv_heads": 2, "n_layers": 3, "intermediate_size": 20}
PRUNE_MODULES = ["head", "intermediate", "layer", "hidden", "head_layer", "mlp"]


def tree_hash(root: Path) -> str:
    """Names, symlink targets and bytes of everything under ``root`` (bytecode caches excluded: other
    processes may compile the standard library meanwhile)."""
    digest = hashlib.sha256()
    paths = [root] if not root.is_dir() else sorted(root.rglob("*"))
    for path in paths:
        if "__pycache__" in path.parts or "site-packages" in path.parts:
            continue
        digest.update(str(path.relative_to(root) if path != root else ".").encode())
        if path.is_symlink():
            digest.update(os.readlink(path).encode())
        elif path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def run(main: Callable, *args, subprocess_: bool = False, umask: int | None = None) -> subprocess.CompletedProcess:
    """A writer's CLI, as ``python -m`` in a subprocess or through the same ``main`` in this process."""
    argv = [str(a) for a in args]
    if subprocess_:
        return subprocess.run([sys.executable, "-m", MODULES[main], *argv], capture_output=True, text=True,
                              cwd=REPO_ROOT, preexec_fn=None if umask is None else lambda: os.umask(umask))
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        returncode = main(argv)
    return subprocess.CompletedProcess(argv, returncode, stdout.getvalue(), stderr.getvalue())


def assert_error(result: subprocess.CompletedProcess, *fragments: object) -> str:
    """Exit 2, and stderr ends with one ``error:`` line holding every fragment (the paths it must name);
    before it only progress bars (prepare reads its inputs with one before a full disk can strike)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert not any("rror" in line for line in lines[:-1]), result.stderr
    for fragment in fragments:
        assert str(fragment) in lines[-1], lines[-1]
    return lines[-1]


def leftovers(folder: Path) -> list[str]:
    """Hidden entries (temp outputs) in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != MARKER_NAME)


def modes(root: Path) -> set[int]:
    return {p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")] if p.is_file()}


def umask_now() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_refusals(main: Callable, cases: list[tuple[list, Path, Path]], protected: Path) -> None:
    """Each case (argv, out, input) is refused in one line naming both paths; ``protected`` is untouched.
    The first case runs as a real subprocess."""
    before = tree_hash(protected)
    for i, (argv, out, given) in enumerate(cases):
        assert_error(run(main, *argv, subprocess_=i == 0), out, given)
        assert tree_hash(protected) == before, argv


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real inputs: an HF model folder (also the tokenizer), raw text, a converted checkpoint with a
    ``latest`` symlink, and metrics of two runs."""
    root = tmp_path_factory.mktemp("inputs")
    hf = root / "hf"
    tiny_hf_llama().save_pretrained(hf)
    save_tokenizer(hf)
    raw = root / "data" / "raw"
    raw.mkdir(parents=True)
    for domain in ("a", "b"):
        docs = ["".join(chr(97 + (i * k + len(domain)) % 26) for k in range(40)) for i in range(30)]
        (raw / f"{domain}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ck = root / "ck"
    ck.mkdir()
    composer_to_hf.save_hf_to_composer(hf, ck / "ep0-ba2-rank0.pt")
    (ck / "latest-rank0.pt").symlink_to("ep0-ba2-rank0.pt")
    runs = root / "runs"
    for run_dir in (runs / "teamA" / "checkpoints", runs / "teamB"):
        run_dir.mkdir(parents=True)
        lines = [{"batch": b, "loss/train/total": 4.0 - 0.1 * b} for b in range(1, 5)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {"root": root, "hf": hf, "data": root / "data", "raw": raw, "ck": ck, "runs": runs}


# --- 1. an output that is, contains or lies inside an input ------------------------------------------


def test_prepare_output_overlapping_input_is_refused(fx, tmp_path):
    raw, tok = fx["raw"], ["--tokenizer", fx["hf"], "--max-seq-len", 16]
    check_refusals(prepare.main, [
        ([*tok, "--out", raw, "--overwrite", f"a={raw}"], raw, raw),  # the issue's `--out D --overwrite a=D`
        ([*tok, "--out", fx["data"], "--overwrite", f"a={raw}"], fx["data"], raw),
        ([*tok, "--out", raw / "mds", f"a={raw}"], raw / "mds", raw),
    ], fx["data"])
    result = run(prepare.main, *tok, "--out", tmp_path / "mds", f"a={raw / 'a.jsonl'}", f"b={raw / 'b.jsonl'}")
    assert result.returncode == 0, result.stderr
    assert modes(tmp_path / "mds") == {0o666 & ~umask_now()}


def test_demo_data_output_overlapping_the_standard_library_is_refused(tmp_path, monkeypatch):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    inside = stdlib / f"llmhift-demo-{os.getpid()}"  # never created: the refusal comes first
    check_refusals(demo_data.main, [
        ([stdlib], stdlib, stdlib),
        ([stdlib.parent], stdlib.parent, stdlib),
        ([inside], inside, stdlib),
    ], stdlib)
    assert not inside.exists()
    # The follow-up build, with every domain capped small so that it takes seconds.
    monkeypatch.setattr(demo_data, "DOMAINS", {k: (f, 20_000) for k, (f, _) in demo_data.DOMAINS.items()})
    result = run(demo_data.main, tmp_path / "demo", "--max-seq-len", 16, "--vocab-size", 300)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "demo" / MARKER_NAME).read_text())["command"] == demo_data.COMMAND


def test_save_hf_to_composer_output_overlapping_input_is_refused(fx, tmp_path):
    hf = fx["hf"]
    check_refusals(composer_to_hf.main, [
        (["save_hf_to_composer", hf, hf, "overwrite=true"], hf, hf),
        (["save_hf_to_composer", hf, fx["root"], "overwrite=true"], fx["root"], hf),
        (["save_hf_to_composer", hf, hf / "model.pt"], hf / "model.pt", hf),
    ], hf)
    assert run(composer_to_hf.main, "save_hf_to_composer", hf, tmp_path / "model.pt").returncode == 0
    assert modes(tmp_path) == {0o666 & ~umask_now()}


def test_save_composer_to_hf_output_overlapping_its_checkpoint_is_refused(fx, tmp_path):
    ck, latest = fx["ck"], fx["ck"] / "latest-rank0.pt"
    # `latest` through a symlink into another folder: the symlink's target is an input too.
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(ck / "ep0-ba2-rank0.pt", store / "ep0-ba2-rank0.pt")
    (tmp_path / "latest-rank0.pt").symlink_to(store / "ep0-ba2-rank0.pt")
    check_refusals(composer_to_hf.main, [
        (["save_composer_to_hf", latest, ck, "overwrite=true"], ck, latest),  # the case
        (["save_composer_to_hf", latest, latest, "overwrite=true"], latest, latest),
        (["save_composer_to_hf", latest, fx["root"], "overwrite=true"], fx["root"], latest),
        (["save_composer_to_hf", latest, fx["hf"] / "export", f"tokenizer={fx['hf']}"], fx["hf"] / "export", fx["hf"]),
    ], fx["root"])
    before = tree_hash(store)
    assert_error(run(composer_to_hf.main, "save_composer_to_hf", tmp_path / "latest-rank0.pt", store,
                     "overwrite=true"), store, store / "ep0-ba2-rank0.pt")
    assert tree_hash(store) == before
    # The follow-up beside the checkpoint, with a umask that differs from the usual 022.
    result = run(composer_to_hf.main, "save_composer_to_hf", tmp_path / "latest-rank0.pt", tmp_path / "hf",
                 subprocess_=True, umask=0o002)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777 == 0o664  # safetensors alone: 0600
    assert modes(tmp_path / "hf") == {0o664}


def test_prune_and_save_model_output_overlapping_its_checkpoint_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    _, latest = pruning_checkpoint(tmp_path, 4, False, PRUNE_MODULES, PRUNE_TARGET)
    monolithic = tmp_path / "ep0-ba4-rank0.pt"
    # A sharded checkpoint folder (what FSDP runs write), for an output that lies inside an input.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.yaml").write_text((tmp_path / "config.yaml").read_text())
    weights = torch.load(monolithic, weights_only=False)["state"]["model"]
    dcp.save({"state": {"model": weights}}, checkpoint_id=sharded / "ep0-ba4", no_dist=True)
    (sharded / "latest-rank0.pt").symlink_to("ep0-ba4")
    out = tmp_path / "pruned-latest-rank0.pt"
    sharded_out = sharded / "pruned-latest-rank0.pt"
    cases = [(out, monolithic), (out, "."), (sharded_out, "ep0-ba4/pruned.pt")]
    argv = [["prune_and_save_model", latest], ["prune_and_save_model", latest],
            ["prune_and_save_model", sharded / "latest-rank0.pt"]]
    before = tree_hash(tmp_path)
    for i, ((link, target), args) in enumerate(zip(cases, argv)):
        link.symlink_to(target)
        given = latest if link == out else sharded / "latest-rank0.pt"
        assert_error(run(post_pruning_processing.main, *args, subprocess_=i == 0), link, given)
        link.unlink()
        assert tree_hash(tmp_path) == before
    assert run(post_pruning_processing.main, "prune_and_save_model", latest).returncode == 0
    assert run(post_pruning_processing.main, "prune_and_save_model", sharded / "latest-rank0.pt").returncode == 0
    assert modes(tmp_path) == {0o666 & ~umask_now()}


def test_report_output_overlapping_its_runs_is_refused(fx, tmp_path):
    runs, metrics = fx["runs"], fx["runs"] / "teamB" / "metrics.jsonl"
    check_refusals(report.main, [
        ([runs, "--out", runs], runs, runs / "teamA" / "checkpoints" / "metrics.jsonl"),  # the case
        ([runs, "--out", metrics], metrics, metrics),
        ([runs, "--out", metrics / "plots"], metrics / "plots", metrics),
    ], runs)
    out = tmp_path / "report"
    assert run(report.main, runs, "--out", out).returncode == 0
    assert run(report.main, runs, "--out", out).returncode == 0  # its own previous report: refreshed, no flag
    assert (out / "report.md").is_file() and leftovers(tmp_path) == []
    # A report written before output markers (report.md and PNGs, nothing else) is recognised as one.
    old = tmp_path / "old_report"
    old.mkdir()
    (old / "report.md").write_text("# llmhift run report\n")
    (old / "teamA_loss.png").write_bytes(b"\x89PNG")
    assert run(report.main, runs, "--out", old).returncode == 0
    assert json.loads((old / MARKER_NAME).read_text())["command"] == report.COMMAND


def test_hift_offload_dir_overlapping_the_save_folder_is_refused(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "notes.txt").write_text("an earlier run's notes")
    before = tree_hash(tmp_path)
    for offload, relation in ((ck, "is"), (tmp_path, "contains"), (ck / "parked", "lies inside")):
        with pytest.raises(OutputError) as refused:
            make_trainer(HiFTCallback(group_element=2, offload_dir=str(offload)), save_folder=ck)
        message = str(refused.value)
        assert "\n" not in message and f"output {offload} {relation} input {ck}" in message
        assert tree_hash(tmp_path) == before
    parked = tmp_path / "parked"
    for i in range(2):  # the second run finds the first one's rank folder: its own, so reused
        hift = HiFTCallback(group_element=2, offload_dir=str(parked))
        make_trainer(hift, save_folder=tmp_path / f"run{i}", max_duration="3ba").fit()
        assert any(isinstance(p, Path) and p.parent == parked / "rank0" for p in hift._parked.values())


# --- 2. overwrite: only the command's own previous output ----------------------------------------------


def test_overwrite_of_a_foreign_output_is_refused_and_of_its_own_allowed(fx, tmp_path):
    latest, hf = fx["ck"] / "latest-rank0.pt", fx["hf"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    assert_error(run(composer_to_hf.main, "save_composer_to_hf", latest, foreign, "overwrite=true"),
                 foreign, "not written by save_composer_to_hf")
    assert_error(run(report.main, fx["runs"], "--out", foreign), foreign, "not written by llmhift.report")
    # A training checkpoint carries llmhift metadata too, yet is not a converter's output.
    composer_ckpt = tmp_path / "ep0-ba9-rank0.pt"
    torch.save({"state": {"model": {}, "optimizers": {}}, "llmhift": {"written_by": composer_to_hf.TO_COMPOSER}},
               composer_ckpt)
    assert_error(run(composer_to_hf.main, "save_hf_to_composer", hf, composer_ckpt, "overwrite=true"),
                 composer_ckpt, "not written by save_hf_to_composer")
    assert (foreign / "notes.txt").read_text() == "precious" and composer_ckpt.stat().st_size > 0
    own = tmp_path / "own"
    for _ in range(2):
        assert run(composer_to_hf.main, "save_composer_to_hf", latest, own, "overwrite=true").returncode == 0
        result = run(composer_to_hf.main, "save_hf_to_composer", hf, tmp_path / "own.pt", "overwrite=true")
        assert result.returncode == 0, result.stderr
    (tmp_path / "prune").mkdir()
    _, pruning_ckpt = pruning_checkpoint(tmp_path / "prune", 4, False, PRUNE_MODULES, PRUNE_TARGET)
    (tmp_path / "prune" / "pruned-latest-rank0.pt").write_bytes(b"someone else's file")
    assert_error(run(post_pruning_processing.main, "prune_and_save_model", pruning_ckpt, "overwrite=true"),
                 "not written by prune_and_save_model")
    (tmp_path / "prune" / "pruned-latest-rank0.pt").unlink()
    for _ in range(2):
        result = run(post_pruning_processing.main, "prune_and_save_model", pruning_ckpt, "overwrite=true")
        assert result.returncode == 0, result.stderr
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "prune") == []


# --- 3. a full disk ----------------------------------------------------------------------------------


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``budget`` bytes have been written through all of them."""

    written = 0

    def __init__(self, file: io.IOBase, budget: int) -> None:
        self._file, self._budget = file, budget

    def write(self, data) -> int:
        if _FullDisk.written + len(data) > self._budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _FullDisk.written += len(data)
        return self._file.write(data)

    def __getattr__(self, name: str):
        return getattr(self._file, name)

    def __enter__(self) -> "_FullDisk":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()


@pytest.fixture
def full_disk(monkeypatch, tmp_path):
    """Every file opened for writing under ``tmp_path`` fills the disk after 2 KiB (``open`` is the
    lowest Python write call; safetensors writes from Rust, so its ``save_file`` raises what it raises
    on a full disk instead)."""
    real_open = io.open
    _FullDisk.written = 0

    def open_(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        writing = any(c in mode for c in "wax+") and isinstance(file, (str, os.PathLike))
        if writing and Path(file).absolute().is_relative_to(tmp_path):
            return _FullDisk(handle, 2048)
        return handle

    def save_file(tensors, filename, metadata=None):
        with open_(filename, "wb") as f:
            f.write(b"\0" * 4096)  # fails: the partial file is what a real full disk leaves

    monkeypatch.setattr("builtins.open", open_)
    monkeypatch.setattr("io.open", open_)
    monkeypatch.setattr("llmhift.checkpoint.io.save_file", save_file)
    return tmp_path


def test_enospc_in_every_writer_is_one_line_and_leaves_nothing(fx, full_disk, monkeypatch):
    latest, hf, raw, tmp = fx["ck"] / "latest-rank0.pt", fx["hf"], fx["raw"], full_disk
    before = tree_hash(fx["root"])
    (tmp / "prune").mkdir()
    _FullDisk.written = -10**9  # the pruning checkpoint itself still fits
    _, pruning_ckpt = pruning_checkpoint(tmp / "prune", 4, False, PRUNE_MODULES, PRUNE_TARGET)
    monkeypatch.setattr(demo_data, "DOMAINS", {k: (f, 20_000) for k, (f, _) in demo_data.DOMAINS.items()})
    cases = [
        (post_pruning_processing.main, ["prune_and_save_model", pruning_ckpt], tmp / "prune" / "pruned-latest-rank0.pt",
         True),
        (demo_data.main, [tmp / "demo", "--max-seq-len", 16, "--vocab-size", 300], tmp / "demo", False),
        (composer_to_hf.main, ["save_composer_to_hf", latest, tmp / "hf"], tmp / "hf", True),
        (composer_to_hf.main, ["save_hf_to_composer", hf, tmp / "model.pt"], tmp / "model.pt", True),
        (prepare.main, ["--tokenizer", hf, "--max-seq-len", 16, "--out", tmp / "mds", f"a={raw / 'a.jsonl'}",
                        f"b={raw / 'b.jsonl'}"], tmp / "mds", False),
        (report.main, [fx["runs"], "--out", tmp / "report"], tmp / "report", False),
    ]
    for main, argv, out, needs_known in cases:
        _FullDisk.written = 0
        result = run(main, *argv)
        line = assert_error(result, f"error: no space left on device writing {out} (")
        assert ("needs about" in line) == needs_known and line.endswith(" bytes free)"), line
        assert not out.exists() and leftovers(tmp) == [] and leftovers(out.parent) == [], line
    assert tree_hash(fx["root"]) == before


def test_enospc_in_hift_offload_names_the_folder(full_disk):
    parked = full_disk / "parked"
    with pytest.raises(NoSpaceError) as full:
        make_trainer(HiFTCallback(group_element=2, offload_dir=str(parked)), max_duration="3ba").fit()
    message = str(full.value)
    assert message.startswith(f"no space left on device writing {parked / 'rank0'} (needs about ")
    assert "\n" not in message


def test_enospc_while_overwriting_keeps_the_previous_output(fx, tmp_path, monkeypatch):
    latest, out = fx["ck"] / "latest-rank0.pt", tmp_path / "hf"
    assert run(composer_to_hf.main, "save_composer_to_hf", latest, out).returncode == 0
    before = tree_hash(out)

    def save_file(tensors, filename, metadata=None):  # what safetensors raises on a full disk
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("llmhift.checkpoint.io.save_file", save_file)
    assert_error(run(composer_to_hf.main, "save_composer_to_hf", latest, out, "overwrite=true", "dtype=fp16"),
                 f"no space left on device writing {out}")
    assert tree_hash(out) == before and leftovers(tmp_path) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 256 KiB tmpfs (smaller than the tiny model's 650 KB of weights), where root can mount one."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_enospc_on_a_real_small_tmpfs(fx, small_tmpfs):
    latest, hf = fx["ck"] / "latest-rank0.pt", fx["hf"]
    before = tree_hash(fx["root"])
    for argv, out in ((["save_composer_to_hf", latest, small_tmpfs / "hf"], small_tmpfs / "hf"),
                      (["save_hf_to_composer", hf, small_tmpfs / "model.pt"], small_tmpfs / "model.pt")):
        result = run(composer_to_hf.main, *argv, subprocess_=True)
        assert_error(result, f"error: no space left on device writing {out} (needs about ")
        assert list(small_tmpfs.iterdir()) == []
    assert tree_hash(fx["root"]) == before


# --- 4. temp outputs of a killed run -------------------------------------------------------------------


def test_stale_temp_outputs_are_removed_or_reported(fx, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free: a run on this host that was killed
    runs = tmp_path / "runs"
    shutil.copytree(fx["runs"], runs)
    host = socket.gethostname()
    stale = runs / f".report.tmp-{host}-{dead.pid}-0123abcd"
    stale.mkdir()
    (stale / "half.png").write_bytes(b"\x89PNG")
    replaced = runs / f".report.old-{host}-{dead.pid}-4567abcd"  # killed after moving the old report aside
    replaced.mkdir()
    (replaced / MARKER_NAME).write_text(json.dumps({"command": report.COMMAND}))
    elsewhere = runs / ".report.tmp-node7.cluster-4242-89abcdef"
    elsewhere.mkdir()
    result = run(report.main, runs, subprocess_=True)
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and not replaced.exists() and elsewhere.is_dir()
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(elsewhere) in warnings[0] and "node7.cluster" in warnings[0]
    assert (runs / "report" / "report.md").is_file()


def test_a_replaced_output_is_put_back_when_its_run_died_between_the_renames(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    old = tmp_path / f".out.old-{socket.gethostname()}-{dead.pid}-0123abcd"
    old.mkdir()
    (old / MARKER_NAME).write_text(json.dumps({"command": "test"}))
    (old / "result.txt").write_text("the previous output")
    with pytest.raises(FileExistsError, match="overwrite"):
        with atomic_directory(out, command="test"):
            pass
    assert (out / "result.txt").read_text() == "the previous output" and not old.exists()
