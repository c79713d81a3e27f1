"""UP-Person PETL behaviour on a tiny real CLIP: init properties, gradients, fused == explicit, merge."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, randomise_petl, sample_batch

from numerics import (
    assert_beyond_rounding,
    assert_paths_within_rounding,
    assert_within_bound,
    elementwise_rounding_bound,
    features,
    model_sensitivity,
    training_step,
    training_step_with_gradients,
)
import upperson
from upperson.backbone import load_backbone
from upperson.petl import AdaptedLayerNorm, KVLoRA, PETLAttention, ScaledPrefix


def frozen_clip_reference() -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict, dict[str, float]]:
    """Frozen CLIP, the batch, and its float64 features with their rounding sensitivity (tests/numerics.py)."""
    plain = load_backbone("tiny", (64, 32)).clip
    images, ids, _ = sample_batch()
    inputs = {"images": images, "ids": ids}
    exact, sensitivity = model_sensitivity(plain, features, inputs)
    return plain, inputs, exact, sensitivity


def test_fresh_model_without_prefix_equals_frozen_clip_in_explicit_form() -> None:
    """LoRA B = 0 and adapter up = 0 at init: the only change from CLIP is the prefix.

    The added terms are exactly zero, but the explicit attention and the exact shortcuts are other
    fp32 kernels than open_clip's: both are held to the rounding bound of CLIP's float64 features.
    """
    model = make_model(prefix=False, attention_backend="explicit")
    plain, inputs, exact, sensitivity = frozen_clip_reference()
    with torch.no_grad():
        paths = {"ours": features(model, inputs), "open_clip": features(plain, inputs)}
    assert_paths_within_rounding(paths, exact, sensitivity)  # ROUNDING_STAGES x S of the float64 features


def test_fresh_model_differs_from_clip_only_through_the_prefix() -> None:
    model = make_model()
    plain, inputs, exact, sensitivity = frozen_clip_reference()
    with torch.no_grad():
        prefixed = features(model, inputs)
        for name in exact:  # the prefix moves the features far beyond any rounding
            assert_beyond_rounding(prefixed[name], exact[name], sensitivity[name], f"prefixed {name}")
        for module in model.modules():
            if isinstance(module, PETLAttention):
                module.prefix = None  # detach the prefix: fresh LoRA and adapters add exact zeros
        paths = {"ours": features(model, inputs), "open_clip": features(plain, inputs)}
    assert_paths_within_rounding(paths, exact, sensitivity)  # other kernels (SDPA, shortcuts): rounding only


def test_initial_values_follow_the_spec() -> None:
    model = make_model(lambda_init=100.0)
    for module in model.modules():
        if isinstance(module, ScaledPrefix):
            assert module.attention_scale.item() == 100.0
            assert module.key_scale.item() == module.value_scale.item() == 1.0
            assert 0.0 <= module.key_tokens.min() and module.key_tokens.max() <= 0.01
        if isinstance(module, KVLoRA):
            for delta in (module.key, module.value):
                width = delta.lora_a.shape[1]
                assert delta.lora_b.abs().sum() == 0 and delta.scale.item() == 1.0
                assert delta.lora_a.abs().max() <= 1 / width**0.5  # kaiming-uniform(a=√5) = U(±1/√fan_in)
        if isinstance(module, AdaptedLayerNorm):
            adapter = module.adapter
            assert adapter.up.weight.abs().sum() == 0 and adapter.up.bias.abs().sum() == 0
            assert adapter.down.bias.abs().sum() == 0 and adapter.scale.item() == 1.0


def test_only_petl_tensors_receive_gradients() -> None:
    model = make_model()
    randomise_petl(model)
    images, ids, pids = sample_batch()
    upperson.losses.sdm_loss(*model(images, ids), pids).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(model.trainable_state_dict())
    assert all(p.grad.abs().sum() > 0 for name, p in model.named_parameters() if p.grad is not None)


@pytest.mark.parametrize("components", [{}, {"adapter": False}, {"lora": False}, {"prefix": False}])
def test_fused_equals_explicit_post_softmax_formula_in_values_and_gradients(components: dict) -> None:
    fused = make_model(**components)
    randomise_petl(fused)
    explicit = make_model(attention_backend="explicit", **components)
    explicit.load_state_dict(fused.state_dict())
    images, ids, pids = sample_batch()
    inputs = {"images": images, "ids": ids, "pids": pids}
    paths = {"fused": training_step_with_gradients(fused, inputs), "explicit": training_step_with_gradients(explicit, inputs)}
    # both within ROUNDING_STAGES x S of the float64 features, loss and every gradient (λ included: a leaf of both graphs)
    exact, sensitivity = model_sensitivity(explicit, training_step, inputs, gradients_of="loss")
    assert_paths_within_rounding(paths, exact, sensitivity)


def test_merged_lora_equals_unmerged() -> None:
    model = make_model()
    randomise_petl(model)
    images, ids, _ = sample_batch()
    inputs = {"images": images, "ids": ids}
    attention = model.clip.transformer.resblocks[0].attn
    weight_before = attention.in_proj_weight.detach().clone()
    exact, sensitivity = model_sensitivity(model, features, inputs)
    with torch.no_grad():
        unmerged = features(model, inputs)
        model.merge_lora()
        assert model.lora_merged
        merged_weight = attention.in_proj_weight.detach().clone()
        merged = features(model, inputs)
        model.unmerge_lora()
    assert_paths_within_rounding({"unmerged": unmerged, "merged": merged}, exact, sensitivity)  # ROUNDING_STAGES x S
    # W0 + ΔW then - ΔW, the same ΔW both times: one rounding of the sum and one of the difference
    bound = elementwise_rounding_bound(weight_before.abs() + merged_weight.abs(), roundings=1)
    assert_within_bound(attention.in_proj_weight, weight_before, bound, "unmerged in_proj_weight")


def test_merge_touches_only_key_and_value_rows() -> None:
    model = make_model()
    randomise_petl(model)
    attention = model.clip.visual.transformer.resblocks[0].attn
    before = attention.in_proj_weight.detach().clone()
    model.merge_lora()
    width = before.shape[1]
    assert torch.equal(attention.in_proj_weight[:width], before[:width])
    assert not torch.equal(attention.in_proj_weight[width:], before[width:])


def test_depths_select_blocks_per_component() -> None:
    model = make_model(depth_prefix=1, depth_lora=2, depth_adapter=1)
    blocks = model.clip.visual.transformer.resblocks  # 3 vision blocks
    assert [b.attn.prefix is not None for b in blocks] == [True, False, False]
    assert [b.attn.lora is not None for b in blocks] == [True, True, False]
    assert [isinstance(b.ln_1, AdaptedLayerNorm) for b in blocks] == [False, False, True]
    assert all(isinstance(b.attn, PETLAttention) for b in blocks)


def test_state_dict_keys_do_not_change_after_a_forward() -> None:
    model = make_model()
    keys = list(model.state_dict())
    images, ids, _ = sample_batch()
    with torch.no_grad():
        model(images, ids)
    assert list(model.state_dict()) == keys
    assert "clip.visual.transformer.resblocks.0.ln_1.weight" in keys  # CLIP keys kept on injection


def test_bf16_autocast_stays_close_to_fp32() -> None:
    model = make_model()
    randomise_petl(model)
    images, ids, _ = sample_batch()
    with torch.no_grad():
        reference = model.encode_image(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.encode_image(images)
    assert low.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(low, reference).min() > 0.99


def test_vanilla_prefix_freezes_lambda() -> None:
    model = make_model(learn_lambda=False, lambda_init=1.0)
    names = set(model.trainable_state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("attention_scale") for n in names) and not any(n.endswith("attention_scale") for n in trainable)


def test_unknown_option_is_rejected_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="prefix_length"):
        make_model(prefix_lenght=4)


@pytest.mark.parametrize(
    "method,options",
    [("up-person", {"prefix_length": 3, "lora_rank": 4}), ("up-person", {"adapter_placement": "parallel-mha+parallel-mlp"}),
     ("cskt", {"prompt_length": 2})],
)
def test_frozen_weights_stored_in_bf16_change_no_bit_under_autocast(method: str, options: dict) -> None:
    """What the Trainer does under bf16: identical features and gradients, fewer fp32 weights."""
    reference = upperson.create_model(method, backbone="tiny", image_size=(64, 32), **options)
    stored = upperson.create_model(method, backbone="tiny", image_size=(64, 32), **options)
    stored.load_state_dict(reference.state_dict())
    assert stored.store_frozen_matmul_weights(torch.bfloat16) > 0
    assert all(p.dtype == torch.float32 for p in stored.parameters() if p.requires_grad)
    assert stored.clip.visual.transformer.resblocks[-1].mlp.c_fc.weight.dtype == torch.bfloat16
    images, ids, pids = sample_batch(image_size=(64, 32))
    outputs = []
    for model in (reference, stored):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = model(images, ids)
        upperson.losses.sdm_loss(*features, pids).backward()
        outputs.append((features, {name: p.grad for name, p in model.named_parameters() if p.requires_grad}))
    (ref_features, ref_grads), (features, grads) = outputs
    assert all(torch.equal(a, b) for a, b in zip(ref_features, features))
    assert ref_grads.keys() == grads.keys() and all(torch.equal(ref_grads[k], grads[k]) for k in grads)
