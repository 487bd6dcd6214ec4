"""Rank-0-only loading under FSDP2 on 2 CPU ranks: only rank 0 opens the weight files, and after
wrapping both ranks hold exactly the source weights, sharded.

Three cases, run one after the other in the same 2-rank launch (start-up is most of a launch's
cost): ``model.pretrained`` naming an HF folder (``model.safetensors``) of the demo shape, the same
naming a larger bf16 HF folder (``memory``: ~143 MB as fp32 parameters, so a rank's host-memory growth
while the run is built measures the loading, not the noise), and
Composer's own ``load_path`` naming a Composer ``.pt`` with ``fsdp_config.load_monolith_rank0_only``
(FSDP2 fills ranks > 0 from rank 0 only if they are on the meta device; were they initialised, each
would keep its own half of every tensor, silently). ``model.pretrained`` naming a ``.pt`` takes the
same path in ``build_model`` as the HF folder; tests/test_train.py checks its reader. The source is a
tiny LLaMA of the demo shape saved by ``transformers`` and converted by llmhift's ``save_hf_to_composer``;
its random weights differ from the yaml seed's initialisation, so a rank that kept its own init would show.

This file is also the script each rank runs: ``composer -n 2 tests/test_fsdp_loading.py PLAN.json``,
where the plan maps each case to ``[SOURCE, OUT, overrides...]``. Per case it records every ``open`` of
a file beside SOURCE (a Python audit hook: llmhift's safetensors reader and ``torch.load`` both open
through Python), resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), runs ``train.main`` on
the demo pretrain yaml, and right after the Trainer is built (FSDP wrapping and the broadcast happen
there) records the peak and held RSS above the case's start, gathers the full state dict and writes
``OUT/rank{R}.json`` with a SHA-1 per tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
YAML = "yamls/demo/pretrain.yaml"
LAUNCH_TIMEOUT_S = 240
SHARDED = "fsdp_config={sharding_strategy: FULL_SHARD, state_dict_type: sharded}"
MONOLITH = "fsdp_config={sharding_strategy: FULL_SHARD, state_dict_type: full, load_monolith_rank0_only: true}"
# The memory case's shape: the demo's vocabulary, tokenizer and tied head, wider and deeper; no tensor
# is over 4.2 MB (the embedding) of the 143 MB, so a rank holding its shard and one full tensor stays near half.
MEMORY_SHAPE = {"model.d_model": 512, "model.n_layers": 12, "model.n_heads": 8, "model.n_kv_heads": 4,
                "model.intermediate_size": 1376}
# case: (source folder or file, the weight files rank 0 opens, in order, how the run is told to load it)
CASES = {
    "memory": ("hf_bf16", ["model.safetensors"],  # one small batch: the loading is what it is here for
               ["model.pretrained={source}", SHARDED, *(f"{k}={v}" for k, v in MEMORY_SHAPE.items()),
                "global_train_batch_size=2", "device_train_microbatch_size=1", "device_eval_batch_size=2"]),
    "hf_dir": ("hf", ["model.safetensors"], ["model.pretrained={source}", SHARDED]),
    # load_path is opened twice by rank 0: check_load_path maps it to see that it loads (reading the
    # pickle, not the tensors) before anything is built, then Composer loads it.
    "load_path": ("pt/model.pt", ["model.pt", "model.pt"], ["load_path={source}", "load_weights_only=true", MONOLITH]),
}


def tensor_digest(tensor) -> str:
    """SHA-1 of a tensor's bytes with its dtype and shape: equal digests mean bit-identical tensors."""
    import torch

    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha1(f"{tensor.dtype}{tuple(tensor.shape)}".encode() + raw).hexdigest()


@pytest.fixture(scope="module")
def runs(demo_root, tmp_path_factory):
    """One 2-rank FSDP2 launch running 1 batch of each case in turn; returns {case: (expected digests,
    per-rank records, launch result, logs folder)}."""
    import torch
    import transformers
    from safetensors.torch import load_file

    from llmhift.convert.composer_to_hf import save_hf_to_composer
    from llmhift.models.hf_adapter import hf_to_llmhift_state_dict
    from tests.helpers import launch_ranks  # here: this file also runs as a rank's script

    tmp = tmp_path_factory.mktemp("fsdp_loading")
    demo_shape = dict(vocab_size=2048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=352, tie_word_embeddings=True, max_position_embeddings=128)
    memory_shape = dict(demo_shape, hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                        num_key_value_heads=4, intermediate_size=1376)
    with torch.random.fork_rng():
        torch.manual_seed(1234)  # not the yaml's seed (17): loaded weights differ from a fresh init
        for folder, shape, dtype in (("hf", demo_shape, torch.float32), ("hf_bf16", memory_shape, torch.bfloat16)):
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).to(dtype)
            hf.save_pretrained(tmp / folder)  # model.safetensors; the tied head is not stored
    (tmp / "pt").mkdir()
    save_hf_to_composer(tmp / "hf", tmp / "pt" / "model.pt")
    # the reference: the weight file as safetensors' own reader gives it, in the model's fp32
    reference = {folder: {k: tensor_digest(v.float()) for k, v in hf_to_llmhift_state_dict(
        load_file(tmp / folder / "model.safetensors"), True).items()} for folder in ("hf", "hf_bf16")}

    plan = {}
    for case, (source, _, how) in CASES.items():
        source = tmp / source
        plan[case] = [str(source), str(tmp / case / "out"), f"variables.data_root={demo_root}",
                      f"save_folder={tmp / case / 'ckpt'}", "max_duration=1ba", "eval_interval=1ba",
                      "eval_subset_num_batches=1", "device_train_microbatch_size=8", "progress_bar=false",
                      "log_to_console=false", *(a.replace("{source}", str(source)) for a in how)]  # fmt: skip
    (tmp / "plan.json").write_text(json.dumps(plan))
    logs = tmp / "logs"
    result = launch_ranks(__file__, [str(tmp / "plan.json")], logs, LAUNCH_TIMEOUT_S, env={"FSDP_VERSION": "2"})
    results = {}
    for case in CASES:
        out = tmp / case / "out"
        records = [json.loads(p.read_text()) if p.is_file() else None for p in (out / f"rank{r}.json" for r in (0, 1))]
        source = "hf_bf16" if case == "memory" else "hf"  # load_path's .pt is converted from the hf folder
        results[case] = (reference[source], records, result, logs)
    return results


def _records(run) -> list[dict]:
    from tests.helpers import rank_logs

    _, records, result, logs = run
    assert result.returncode == 0 and None not in records, f"{result.stdout[-4000:]}{rank_logs(logs)}"
    assert [r["exit_code"] for r in records] == [0, 0]
    return records


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_only_rank0_opens_the_weights(runs, case):
    rank0, rank1 = _records(runs[case])
    # Every rank needs the architecture, which model.pretrained's config.json gives (a few hundred bytes);
    # rank 1 opens nothing else beside the source.
    assert [name for name in rank1["opened"] if name != "config.json"] == [], "rank 1 read the checkpoint"
    opened_weights = [name for name in rank0["opened"] if name.endswith((".safetensors", ".pt", ".bin"))]
    assert opened_weights == CASES[case][1], rank0["opened"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_both_ranks_hold_the_source_weights_sharded(runs, case):
    expected = runs[case][0]
    assert "model.lm_head.weight" not in expected  # tied: the head is the embedding, one tensor on each side
    for rank, record in enumerate(_records(runs[case])):
        # Composer took the broadcast path (rank 0 materialised, rank 1 on the meta device)
        assert record["sync_module_states"] is True, rank
        assert record["full_state"] == expected, f"rank {rank} differs from the source"
        # every parameter is a DTensor whose local shard is a strict part of it
        assert record["sharded"] and all(record["sharded"].values()), record["sharded"]


@pytest.mark.slow
def test_loading_grows_rank1_by_its_shard_not_by_a_model_copy(runs):
    """While train.py builds the run (model, FSDP2 wrapping, broadcast), rank 1's peak RSS grows by its
    fp32 shard (half the model) and one full tensor at a time, not by a copy of the model; rank 0, which
    materialises the model, shows that the measure sees a full copy where there is one."""
    rank0, rank1 = _records(runs["memory"])
    model_bytes = rank1["model_bytes"]
    assert model_bytes > 140e6, model_bytes  # the signal: the fp32 model, against tens of MB of noise
    assert rank0["rss_peak_growth"] > model_bytes, rank0
    assert rank1["rss_peak_growth"] < 0.7 * model_bytes, rank1
    assert rank1["rss_held_growth"] > 0.45 * model_bytes, rank1  # its shard, now resident


def test_safetensors_reader_matches_the_library_and_names_a_broken_file(tmp_path):
    """Rank 0's reader (memory-mapped, parsed by llmhift) gives what safetensors' own reader gives."""
    import torch
    from safetensors.torch import load_file, save_file

    from llmhift.checkpoint.io import map_safetensors
    from llmhift.models.hf_adapter import ConversionError

    tensors = {
        "w": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "ids": torch.arange(5),
        "scalar": torch.tensor(2.5, dtype=torch.float16), "empty": torch.zeros(0, 4),
        "flags": torch.tensor([True, False]),
    }  # fmt: skip
    save_file(tensors, tmp_path / "t.safetensors")
    mapped, reference = map_safetensors(tmp_path / "t.safetensors"), load_file(tmp_path / "t.safetensors")
    assert {k: tensor_digest(v) for k, v in mapped.items()} == {k: tensor_digest(v) for k, v in reference.items()}
    mapped["w"].add_(1)  # copy-on-write: the file keeps its bytes
    assert torch.equal(load_file(tmp_path / "t.safetensors")["w"], tensors["w"])

    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "t.safetensors").read_bytes()[:-4])
    with pytest.raises(ConversionError, match="cut.safetensors: .* truncated"):
        map_safetensors(tmp_path / "cut.safetensors")


def _rank_main(argv: list[str]) -> int:
    plan = json.loads(Path(argv[0]).read_text())
    watch: dict = {}  # the running case's source folder ("folder") and the files opened in it ("opened")

    def audit(event: str, args: tuple) -> None:
        # `open` is raised by builtins.open / io.open (and so by torch.load and llmhift's safetensors
        # reader) with the path as given; a descriptor (int) is not a path.
        if event == "open" and watch and isinstance(args[0], (str, bytes, os.PathLike)):
            path = Path(os.fsdecode(args[0])).resolve()
            if path.is_relative_to(watch["folder"]):
                watch["opened"].append(str(path.relative_to(watch["folder"])))

    sys.addaudithook(audit)  # before anything is built; a hook cannot be removed, and this process ends soon
    sys.path.insert(0, str(REPO_ROOT))
    exit_codes = []
    for source, out, *overrides in plan.values():  # both cases in this one process group, one after the other
        source = Path(source).resolve()
        watch.update(folder=source if source.is_dir() else source.parent, opened=[])
        exit_codes.append(_run_case(Path(out), overrides, watch["opened"]))
    return max(exit_codes)


def _run_case(out: Path, overrides: list[str], opened: list[str]) -> int:
    from composer.utils import dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    import llmhift.build.trainer as build
    from tests.helpers import run_train_main

    record: dict = {}
    build_model = build.build_model

    def measured_build_model(*args, **kwargs):  # build_trainer calls it after the data loaders, before the Trainer
        Path("/proc/self/clear_refs").write_text("5")  # the peak-RSS mark (VmHWM) restarts from here
        record["rss_baseline"] = _status_bytes("VmRSS")
        return build_model(*args, **kwargs)

    build.build_model = measured_build_model  # this rank's build_trainer measures from here on

    def setup(trainer) -> None:  # train.py has built the model (rank 0 read), wrapped it with FSDP2, broadcast
        record["rss_peak_growth"] = _status_bytes("VmHWM") - record["rss_baseline"]
        record["rss_held_growth"] = _status_bytes("VmRSS") - record["rss_baseline"]
        model = trainer.state.model
        record["sync_module_states"] = trainer.state.fsdp_config.sync_module_states
        record["sharded"] = {
            n: isinstance(p, DTensor) and p.to_local().numel() < p.numel() for n, p in model.named_parameters()
        }
        # full_state_dict without cpu_offload: every rank all-gathers every tensor
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        record["full_state"] = {k: tensor_digest(v) for k, v in full.items()}
        record["model_bytes"] = sum(v.numel() * v.element_size() for v in full.values())

    _, exit_code = run_train_main([YAML, *overrides], setup)
    record["exit_code"] = exit_code
    record["opened"] = opened  # the whole run's: building, wrapping, training, evaluating, saving
    out.mkdir(parents=True, exist_ok=True)
    rank = dist.get_global_rank()
    tmp = out / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, out / f"rank{rank}.json")
    return exit_code


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory figure (``VmRSS``, ``VmHWM``: the peak since the last reset) in bytes."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1:]))
