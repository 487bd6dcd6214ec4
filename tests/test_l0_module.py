"""L0Module: hard-concrete gates, the target-sparsity schedule, the Lagrangian, deterministic masks, validation."""

import math

import pytest
import torch

from llmhift.build.config import config_from_dict
from llmhift.build.trainer import build_optimizer
from llmhift.models.l0_module import PRUNING_MODULES, L0Module, mask_shapes
from llmhift.models.llama import ComposerLlama, LlamaConfig, LlamaModel

MHA = LlamaConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, intermediate_size=48)
GQA = LlamaConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=48)
ALL = ["head", "head_layer", "intermediate", "mlp", "hidden", "layer"]
TARGET = {"d_model": 16, "n_heads": 2, "n_layers": 3, "intermediate_size": 24}


def test_gate_probability_and_samples_follow_the_hard_concrete_law():
    l0 = L0Module(MHA, {"d_model": 16}, ["hidden"])
    with torch.no_grad():
        l0.z_loga["hidden"].copy_(torch.linspace(-3, 3, 32)[None])
    # P(gate != 0) = sigmoid(log_alpha - beta * log(-limit_a / limit_b)) = sigmoid(log_alpha + 1.5986)
    expected = torch.sigmoid(torch.linspace(-3, 3, 32) + (2 / 3) * math.log(11))
    torch.testing.assert_close(l0.score("hidden")[0], expected)
    torch.manual_seed(0)
    draws = torch.stack([l0.sample("hidden")[0] for _ in range(20000)])  # (N, 32)
    assert draws.min() >= 0 and draws.max() <= 1
    assert (draws == 1).any() and (draws == 0).any()  # the stretch really reaches both ends
    torch.testing.assert_close((draws > 0).float().mean(0), expected, atol=0.015, rtol=0)


def test_init_opens_every_gate_and_expected_params_match_the_shape():
    for source in (MHA, GQA):
        l0 = L0Module(source, TARGET, ALL)
        assert l0.score("head").min() > 0.99  # log_alpha ~ N(5, 0.01): the full model at the start
        with torch.no_grad():
            for z in l0.z_loga.values():
                z.fill_(40.0)  # every gate surely open: expected size == the source's exact size
        with torch.device("meta"):
            model = LlamaModel(source)
        matmul = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers.") and "norm" not in n)
        assert l0.non_embedding_params(source) == matmul
        assert l0.expected_params().item() == pytest.approx(matmul, rel=1e-6)
        with torch.device("meta"):
            target = LlamaModel(l0.target)
        assert (l0.target.d_model, l0.target.n_heads, l0.target.n_layers) == (16, 2, 3)
        target_matmul = sum(p.numel() for n, p in target.named_parameters() if n.startswith("layers.") and "norm" not in n)
        assert l0.non_embedding_params(l0.target) == target_matmul


def test_target_sparsity_warms_up_linearly_step_by_step():
    l0 = L0Module(MHA, TARGET, ["head", "layer", "hidden", "intermediate"], lagrangian_warmup_steps="4ba",
                  start_sparsity=0.1)
    head = [l0.target_sparsity("head", step) for step in range(7)]
    assert head == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5])
    layer = [l0.target_sparsity("layer", step) for step in range(6)]
    assert layer == pytest.approx([0.1, 0.1375, 0.175, 0.2125, 0.25, 0.25])


def test_lagrangian_is_lambda_weighted_gap_mean_over_rows():
    l0 = L0Module(MHA, {"n_heads": 2}, ["head"], lagrangian_warmup_steps=0)
    with torch.no_grad():
        l0.z_loga["head"].copy_(torch.tensor([[9.0, 9.0, 9.0, 9.0], [9.0, 9.0, -9.0, -9.0]] * 2))
        l0.lambda_1["head"].fill_(2.0)
        l0.lambda_2["head"].fill_(3.0)
    sparsity = l0.expected_sparsity("head")  # ~[0, 0.5, 0, 0.5]
    gaps = sparsity - 0.5
    expected = (2.0 * gaps + 3.0 * gaps**2).mean()
    torch.testing.assert_close(l0.lagrangian(), expected)
    assert l0.lagrangian().item() == pytest.approx(2 * (-0.25) + 3 * 0.125, abs=1e-3)


def test_deterministic_masks_keep_exactly_the_target_count_per_layer():
    l0 = L0Module(GQA, {**TARGET, "n_kv_heads": 1}, ALL)
    torch.manual_seed(0)
    with torch.no_grad():
        for z in l0.z_loga.values():
            z.normal_(0, 2)
    masks = l0.deterministic_masks(exact_target=True)
    assert (masks["hidden"] != 0).sum() == 16
    assert ((masks["intermediate"] != 0).sum(-1) == 24).all()
    assert (masks["layer"] != 0).sum() == 3
    assert ((masks["head_layer"] != 0).sum() == 4) and ((masks["mlp"] != 0).sum() == 4)  # target keeps sublayers
    head = masks["head"]  # (L, H): one gate per KV group, repeated over its 2 query heads
    assert head.shape == (4, 4) and ((head != 0).sum(-1) == 2).all()
    torch.testing.assert_close(head, l0.deterministic("head", True).repeat_interleave(2, -1))
    # Per row the largest log-alphas keep sigmoid(1.2 * log_alpha) (LLM-Shearing's deterministic_z scales by
    # 0.8 / beta, beta = 2/3), the rest are 0. Stated for two rows of 4 gates keeping 2:
    small = L0Module(LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, intermediate_size=4),
                     {"intermediate_size": 2}, ["intermediate"])
    with torch.no_grad():
        small.z_loga["intermediate"].copy_(torch.tensor([[3.0, -1.0, 2.0, 0.5], [-0.5, -2.0, -1.0, 1.0]]))
    expected = torch.tensor([[0.973403, 0.0, 0.916827, 0.0],   # sigmoid(3.6), sigmoid(2.4)
                             [0.354344, 0.0, 0.0, 0.768525]])  # sigmoid(-0.6): a kept gate may sit below 0.5
    torch.testing.assert_close(small.deterministic_masks(exact_target=True)["intermediate"], expected,
                               rtol=0, atol=1e-6)
    l0.eval_target_model = True
    assert all(torch.equal(l0.eval()()[k], masks[k]) for k in masks)
    assert set(l0.train()()) == set(ALL)


def test_current_shape_follows_the_expected_gate_counts():
    l0 = L0Module(MHA, {"d_model": 16, "n_heads": 2}, ["head", "hidden"])
    with torch.no_grad():
        l0.z_loga["head"][:, :3] = 9.0
        l0.z_loga["head"][:, 3:] = -9.0
        l0.z_loga["hidden"][:, :20] = 9.0
        l0.z_loga["hidden"][:, 20:] = -9.0
    shape = l0.current_shape()
    assert shape == {"d_model": 20, "n_heads": 3, "n_kv_heads": 3, "n_layers": 4, "intermediate_size": 48}
    assert ((l0.deterministic_masks(exact_target=False)["head"] != 0).sum(-1) == 3).all()


@pytest.mark.parametrize("target, modules, message", [
    ({"d_model": 16}, ["head"], "target_model.d_model 16 .*needs 'hidden'"),
    ({"n_layers": 2}, ["head"], "needs 'layer'"),
    ({"intermediate_size": 8}, ["hidden"], "needs 'intermediate'"),
    ({"n_heads": 2}, ["hidden"], "needs 'head'"),
    ({"n_heads": 3}, ["head"], "n_heads: 3 is not a multiple of the source's 2 query heads"),
    ({"n_heads": 2, "n_kv_heads": 2}, ["head"], "must keep the source's 2 query heads per key/value head"),
    ({"d_model": 64}, ["hidden"], "target_model.d_model: 64 must be an int in 1..32"),
    ({"n_layer": 2}, ["layer"], "unknown key.*n_layer"),
    ({}, ["heads"], "pruning_modules.*choose from"),
])
def test_bad_targets_name_the_key_and_the_fix(target, modules, message):
    with pytest.raises(ValueError, match=message):
        L0Module(GQA, target, modules)


def test_bad_warmup_is_refused():
    with pytest.raises(ValueError, match="lagrangian_warmup_steps.*'640ba'"):
        L0Module(MHA, {}, ["head"], lagrangian_warmup_steps="1ep")


def pruning_config(**optimizer):
    model = dict(name="llama", vocab_size=64, d_model=32, n_layers=4, n_heads=4, intermediate_size=48,
                 l0_module=dict(pruning_modules=["head", "hidden"], target_model={"n_heads": 2, "d_model": 16}))
    return config_from_dict(dict(model=model, train_loader={"dataset": {"local": "unused"}}, max_duration="1ba",
                                 global_train_batch_size=2, callbacks={"pruning": {}},
                                 optimizer={"lr": 1e-3, **optimizer}))


def test_optimizer_groups_model_masks_and_ascending_lambdas():
    config = pruning_config(lag_lr=0.5)
    l0 = L0Module.from_dict(LlamaConfig(**{k: v for k, v in config.model.items() if k not in ("name", "l0_module")}),
                            config.model["l0_module"])
    model = ComposerLlama(l0.source, mask_source=l0)
    groups = build_optimizer(config, model).param_groups
    assert [g["lr"] for g in groups] == [1e-3, 0.5, -0.5]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in l0.z_loga.values()}
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in (*l0.lambda_1.values(), *l0.lambda_2.values())}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # One step of the penalty alone: sparsity (~0) is below the target (0.5), so ascent drives
    # lambda_1 negative (raising the reward for sparsity) and lambda_2 up.
    optimizer = build_optimizer(config, model)
    l0.lagrangian().backward()
    optimizer.step()
    for name in ("head", "hidden"):
        assert l0.lambda_1[name].item() < 0 and l0.lambda_2[name].item() > 0


def test_lag_lr_and_the_callback_are_required():
    from llmhift.build.config import ConfigError
    from llmhift.build.trainer import build_l0_module

    with pytest.raises(ConfigError, match="optimizer.lag_lr: required"):
        build_l0_module(pruning_config())
    config = pruning_config(lag_lr=1.0)
    config.callbacks = {}
    with pytest.raises(ConfigError, match="callbacks.pruning"):
        build_l0_module(config)


def test_checkpoints_with_scalar_lambdas_still_load():
    """Before FSDP2 support the Lagrange multipliers were 0-dim; such checkpoints load into (1,) vectors."""
    l0 = L0Module(MHA, TARGET, ALL)
    old = {k: (v.reshape(()) if k.startswith("lambda_") else v) + 0.25 for k, v in l0.state_dict().items()}
    fresh = L0Module(MHA, TARGET, ALL)
    fresh.load_state_dict(old, strict=True)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value.reshape(old[key].shape), old[key]), key
    assert fresh.lambda_1["head"].shape == (1,)


def test_mask_shapes_are_what_the_l0_module_learns_and_the_model_takes():
    gqa = LlamaConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=48)
    assert mask_shapes(gqa) == {"head": (3, 4), "head_layer": (3,), "intermediate": (3, 48), "mlp": (3,),
                                "hidden": (32,), "layer": (3,)}
    tables = {"head": (3, 2), "head_layer": (1, 3), "intermediate": (3, 48), "mlp": (1, 3), "hidden": (1, 32),
              "layer": (1, 3)}  # one head gate per key/value group
    assert mask_shapes(gqa, tables=True) == tables
    l0 = L0Module(gqa, {"n_heads": 2, "n_layers": 2, "intermediate_size": 24, "d_model": 16}, PRUNING_MODULES)
    assert {name: tuple(z.shape) for name, z in l0.z_loga.items()} == tables
    for mode in (l0.train, l0.eval):
        mode()
        assert {name: tuple(m.shape) for name, m in l0().items()} == mask_shapes(gqa)
