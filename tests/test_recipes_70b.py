"""The 70B recipes' dry runs fit an 80 GB GPU: full fine-tuning over 16 ranks, HiFT over one 8-GPU node."""

import re
import subprocess
import sys

import pytest
from transformers import LlamaConfig

GPU_GIB = 79.0  # nvidia-smi: A100 80 GB 81,920 MiB, H100 80 GB 81,559 MiB (79.6 GiB); CUDA context aside


@pytest.fixture(scope="module")
def llama2_70b_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama2-70b")
    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
                rms_norm_eps=1e-5).save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("yaml, world_size", [("yamls/finetune/llama2_70b_fsdp.yaml", 16),
                                               ("yamls/hift/llama2_70b.yaml", 8)])
def test_70b_recipe_fits_80gb(llama2_70b_dir, yaml, world_size):
    out = subprocess.run([sys.executable, "train.py", yaml, f"variables.model_dir={llama2_70b_dir}", "--dry-run",
                          "--world-size", str(world_size), "--gpu", "a100"],
                         capture_output=True, text=True, check=True).stdout
    assert "68,976,648,192 parameters" in out
    assert f"FULL_SHARD over {world_size} ranks" in out
    total = float(re.search(r"^  total +([\d.]+) GiB", out, re.M).group(1))
    assert 20 < total < GPU_GIB, out
    assert f"expected on {world_size} x a100" in out


def test_multinode_launcher_turns_slurm_env_into_composer_arguments(tmp_path):
    """The launcher's command line, with `composer` and `scontrol` replaced by scripts that echo."""
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho gpu-node-07\necho gpu-node-08\n")
    (tmp_path / "composer").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    for tool in ("scontrol", "composer"):
        (tmp_path / tool).chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "COMPOSER": str(tmp_path / "composer"), "GPUS_PER_NODE": "8",
           "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu-node-[07-08]"}
    out = subprocess.run(["scripts/launch_multinode.sh", "yamls/finetune/llama2_70b_fsdp.yaml", "seed=3"],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["-n", "8", "--world_size", "16", "--node_rank", "1", "--master_addr", "gpu-node-07",
                   "--master_port", "29500", "train.py", "yamls/finetune/llama2_70b_fsdp.yaml", "seed=3"]
    del env["SLURM_NODEID"]
    refused = subprocess.run(["scripts/launch_multinode.sh", "y.yaml"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.startswith("error: SLURM_NODEID is not set ;")
