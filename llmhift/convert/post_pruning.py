"""Turn a masked pruning checkpoint into the small dense LLaMA its deterministic masks describe.

    python -m llmhift.convert.post_pruning prune_and_save_model CKPT [config=RUN.yaml] [overwrite=true]

writes ``pruned-<name>`` beside CKPT: ``state.model`` holds the pruned weights and
``llmhift.model_config`` its shape, so ``model.pretrained:`` of a continued-pretraining yaml and
``composer_to_hf save_composer_to_hf`` read it without hand-typed shapes. The source model's metadata
travels on: its config.json with only the pruned shape fields updated, generation_config.json and
tokenizer files. The model and l0_module configs come from CKPT itself (train.py stores them); a
``config=`` or a config.yaml beside CKPT that contradicts them is refused. Checkpoints older than that
take them from ``config=`` or the config.yaml beside.

Masks are folded into the weights before slicing, so the pruned model computes exactly what the
masked model computes. A layer removed by the ``layer`` gate disappears and later layers are
renumbered; a layer that loses only its attention (or only its MLP) keeps the other sublayer and is
recorded in ``layers_without_attn`` (``layers_without_mlp``): ComposerLlama runs it, and the HF
converter refuses it with a message, since HF's LlamaForCausalLM has no such layer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Mapping, Sequence

import torch

from llmhift.atomic import atomic_file, check_destination, check_inputs
from llmhift.checkpoint.io import (
    HF_CONFIG_KEY,
    L0_MODULE_KEY,
    LLMHIFT_KEY,
    MODEL_CONFIG_KEY,
    WRITTEN_BY,
    checked_metadata,
    load_checkpoint,
    model_state_dict,
)
from llmhift.convert.common import file_written_by, parse_overrides, save_torch_file
from llmhift.errors import cli_errors
from llmhift.models.hf_adapter import ConversionError, updated_hf_config
from llmhift.models.l0_module import L0Module, mask_shapes
from llmhift.models.llama import MASK_SOURCE_PREFIX, LlamaConfig

__all__ = ["prune_llama_weights", "prune_and_save_model", "main"]

COMMAND = "prune_and_save_model"  # in the output's llmhift metadata: overwrite=true replaces only such files


def _uniform(counts: dict[int, int], what: str) -> int:
    values = set(counts.values())
    if len(values) > 1:
        raise ConversionError(
            f"layers keep different numbers of {what} ({counts}); ComposerLlama needs one count for every layer"
        )
    return values.pop() if values else 0


def prune_llama_weights(
    weights: Mapping[str, torch.Tensor], config: LlamaConfig, masks: Mapping[str, torch.Tensor]
) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Folds ``masks`` (ComposerLlama's mask shapes) into ``weights`` and slices away what they zero.

    Returns the pruned config and weights; ``ComposerLlama(pruned_config)`` with them gives the
    logits of ``ComposerLlama(config, mask_source=<masks>)`` with the original weights.
    """
    L, H, KV = config.n_layers, config.n_heads, config.n_kv_heads
    group, hd = H // KV, config.head_dim
    w = {k: v.detach().float() for k, v in weights.items()}
    shapes = mask_shapes(config)
    for name, mask in masks.items():
        if tuple(mask.shape) != shapes.get(name):
            raise ConversionError(f"mask {name!r} has shape {tuple(mask.shape)}; a model of this config takes "
                                  f"{shapes.get(name, f'no such mask (names: {list(shapes)})')}")
    full = {name: masks[name].float() if name in masks else torch.ones(shape) for name, shape in shapes.items()}
    layer = full["layer"]  # (L,)
    head = full["head"]  # (L, H)
    head_layer = full["head_layer"] * layer  # (L,)
    inter = full["intermediate"]  # (L, I)
    mlp = full["mlp"] * layer  # (L,)
    hz = full["hidden"]  # (d,)
    keep_h = hz.nonzero().squeeze(-1)  # (d',)
    hk = hz[keep_h]  # (d',)

    # A KV head survives when any query head of its group does; a zero query head inside a kept group
    # stays (its output column of wo is zero) so that every group keeps its size.
    kept_groups = {l: (head[l].view(KV, group) != 0).any(-1).nonzero().squeeze(-1)
                   for l in range(L) if head_layer[l] != 0 and head[l].any()}
    kept_inter = {l: inter[l].nonzero().squeeze(-1) for l in range(L) if mlp[l] != 0 and inter[l].any()}
    n_kv = _uniform({l: len(g) for l, g in kept_groups.items()}, "key/value heads")
    n_inter = _uniform({l: len(c) for l, c in kept_inter.items()}, "intermediate channels")
    survivors = [l for l in range(L) if l in kept_groups or l in kept_inter]
    if not kept_groups or not kept_inter:
        raise ConversionError("the masks prune away every attention or every MLP sublayer; nothing to keep")

    out = {"model.tok_embeddings.weight": w["model.tok_embeddings.weight"][:, keep_h] * hk}  # (V, d')
    tied = config.tie_word_embeddings
    # Tied: the scaled embedding is also the head, which then carries the final norm's hidden gate.
    out["model.norm.weight"] = w["model.norm.weight"][keep_h] * (1.0 if tied else hk)
    if not tied:
        out["model.lm_head.weight"] = w["model.lm_head.weight"][:, keep_h]  # (V, d')
    without_attn, without_mlp = [], []
    for new, l in enumerate(survivors):
        src, dst = f"model.layers.{l}.", f"model.layers.{new}."
        if l in kept_groups:
            kv_rows = (kept_groups[l][:, None] * hd + torch.arange(hd)).flatten()  # (KV'*hd,)
            q_heads = (kept_groups[l][:, None] * group + torch.arange(group)).flatten()  # (H',)
            q_rows = (q_heads[:, None] * hd + torch.arange(hd)).flatten()  # (H'*hd,)
            col_scale = head[l][q_heads].repeat_interleave(hd) * head_layer[l]  # (H'*hd,)
            out[dst + "attn_norm.weight"] = w[src + "attn_norm.weight"][keep_h] * hk
            for name, rows in (("wq", q_rows), ("wk", kv_rows), ("wv", kv_rows)):
                out[dst + f"attn.{name}.weight"] = w[src + f"attn.{name}.weight"][rows][:, keep_h]
            wo = w[src + "attn.wo.weight"][keep_h][:, q_rows]  # (d', H'*hd)
            out[dst + "attn.wo.weight"] = wo * hk[:, None] * col_scale[None, :]
        else:
            without_attn.append(new)
        if l in kept_inter:
            cols = kept_inter[l]  # (I',)
            out[dst + "mlp_norm.weight"] = w[src + "mlp_norm.weight"][keep_h] * hk
            out[dst + "mlp.w_gate.weight"] = w[src + "mlp.w_gate.weight"][cols][:, keep_h]
            out[dst + "mlp.w_up.weight"] = w[src + "mlp.w_up.weight"][cols][:, keep_h]
            down = w[src + "mlp.w_down.weight"][keep_h][:, cols]  # (d', I')
            out[dst + "mlp.w_down.weight"] = down * hk[:, None] * (inter[l][cols] * mlp[l])[None, :]
        else:
            without_mlp.append(new)
    pruned = LlamaConfig.from_dict({
        **config.to_dict(),
        "d_model": len(keep_h),
        "n_layers": len(survivors),
        "n_heads": n_kv * group,
        "n_kv_heads": n_kv,
        "intermediate_size": n_inter,
        "layers_without_attn": without_attn,
        "layers_without_mlp": without_mlp,
    })
    dtype = weights["model.tok_embeddings.weight"].dtype
    return pruned, {k: v.to(dtype).contiguous() for k, v in out.items()}


def prune_and_save_model(
    checkpoint_path: str | Path, config: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Deterministic target masks -> folded, sliced weights -> ``pruned-<name>`` beside the checkpoint."""
    checkpoint_path = Path(checkpoint_path)
    out = checkpoint_path.parent / f"pruned-{checkpoint_path.name}"
    # The output sits in the checkpoint's folder by design: the checkpoint itself (and a symlink's
    # target) is the input it must not be, contain or lie inside.
    inputs = [checkpoint_path, *([config] if config is not None else [])]
    check_inputs(out, inputs)
    check_destination(out, overwrite, COMMAND, lambda path: file_written_by(path, COMMAND))
    meta = checked_metadata(checkpoint_path, config)
    if MODEL_CONFIG_KEY not in meta:
        raise ConversionError(
            f"{checkpoint_path} stores no model config and there is no config.yaml beside it (train.py writes one "
            "into its save_folder); pass config=PATH/TO/run.yaml with the model and model.l0_module sections"
        )
    if L0_MODULE_KEY not in meta:
        raise ConversionError(f"{checkpoint_path} comes from a run without model.l0_module: not a pruning run")
    source = LlamaConfig.from_dict(meta.pop(MODEL_CONFIG_KEY))
    l0 = L0Module.from_dict(source, meta.pop(L0_MODULE_KEY))
    checkpoint = load_checkpoint(checkpoint_path, memory_map=True, model_only=True)
    weights = model_state_dict(checkpoint)
    l0_state = {k[len(MASK_SOURCE_PREFIX):]: v for k, v in weights.items() if k.startswith(MASK_SOURCE_PREFIX)}
    if not l0_state:
        raise ConversionError(f"{checkpoint_path} holds no {MASK_SOURCE_PREFIX}* weights: not a pruning checkpoint")
    l0.load_state_dict(l0_state, strict=True)
    model_weights = {k: v for k, v in weights.items() if not k.startswith(MASK_SOURCE_PREFIX)}
    pruned_config, pruned = prune_llama_weights(model_weights, source, l0.deterministic_masks(exact_target=True))
    meta[MODEL_CONFIG_KEY] = pruned_config.to_dict()
    if HF_CONFIG_KEY in meta:  # the source's config.json, with the pruned shape
        meta[HF_CONFIG_KEY] = updated_hf_config(meta[HF_CONFIG_KEY], pruned_config)
    meta[WRITTEN_BY] = COMMAND
    needs = sum(t.numel() * t.element_size() for t in pruned.values())
    with atomic_file(out, overwrite, command=COMMAND, inputs=inputs, needs=needs,
                     own=lambda path: file_written_by(path, COMMAND)) as tmp:
        save_torch_file({"state": {"model": pruned}, LLMHIFT_KEY: meta}, tmp)
    return out


@cli_errors(OSError, ValueError)
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmhift.convert.post_pruning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prune = commands.add_parser("prune_and_save_model", help="masked checkpoint -> pruned-<name> beside it")
    prune.add_argument("checkpoint")
    prune.add_argument("overrides", nargs="*", metavar="config=PATH | overwrite=true")
    args = parser.parse_args(argv)
    options = parse_overrides(args.overrides)
    unknown = sorted(set(options) - {"config", "overwrite"})
    if unknown:
        raise ConversionError(f"prune_and_save_model takes config=PATH and overwrite=true, not {unknown}")
    if "config" in options:
        options["config"] = str(options["config"])
    out = prune_and_save_model(args.checkpoint, **options)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
