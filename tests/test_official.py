"""Official-layout import: features, SDM loss and every gradient equal the spec's formulas."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL_IMAGE, make_model, sample_batch

import reference
import upperson
from upperson.backbone import load_backbone
from upperson.official import official_backbone_state_dict, official_to_upperson_key

PREFIX, RANK, REDUCTION = 3, 4, 8


def official_state_dict(image_size=SMALL_IMAGE, half_storage: bool = True, seed: int = 3) -> dict[str, torch.Tensor]:
    """A state dict laid out like the official UP-Person model object, with random PETL tensors."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.05):
        return scale * torch.randn(*shape, generator=generator)

    clip = load_backbone("tiny", image_size).clip
    sd = {f"base_model.{key}": value.clone() for key, value in clip.state_dict().items()}
    store = (lambda t: t.half()) if half_storage else (lambda t: t)
    for tower, (lora_name, prefix_name), transformer in (
        ("visual.", reference.TOWERS["visual."], clip.visual.transformer),
        ("", reference.TOWERS[""], clip.transformer),
    ):
        width = transformer.width
        for layer in range(len(transformer.resblocks)):
            lora = f"LORA_learner.lora_{lora_name}.{layer}."
            for index in "01":
                sd[lora + f"lora_A.{index}"] = rand(RANK, width, scale=0.1)
                sd[lora + f"lora_B.{index}"] = rand(width, RANK, scale=0.1)
                sd[lora + f"scale.{index}.scale"] = store(1.0 + rand(()))
            prefix = f"{prefix_name}_prefix_learner.{prefix_name}_prefix.{layer}."
            for kind in ("key", "val"):
                sd[prefix + f"{kind}.tokens"] = store(rand(PREFIX, width, scale=0.5))
                sd[prefix + f"{kind}.scaler.scale"] = store(1.0 + rand(()))
                sd[f"base_model.{tower}transformer.resblocks.{layer}.attn.prefix.{kind}.tokens"] = sd[prefix + f"{kind}.tokens"]
            sd[prefix + "scale_to_grad"] = torch.tensor(3.0) + rand(())
            block = f"base_model.{tower}transformer.resblocks.{layer}."
            for which in ("msa", "mlp"):
                sd[block + f"adapter_ln_{which}.down.weight"] = rand(width // REDUCTION, width, scale=0.2)
                sd[block + f"adapter_ln_{which}.down.bias"] = rand(width // REDUCTION)
                sd[block + f"adapter_ln_{which}.up.weight"] = rand(width, width // REDUCTION, scale=0.2)
                sd[block + f"adapter_ln_{which}.up.bias"] = rand(width)
            sd[block + "scale_1"] = 1.0 + rand(())
            sd[block + "scale_2"] = 1.0 + rand(())
    return sd


def reference_leaves(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 copies; PETL tensors become leaves that collect gradients."""
    leaves = {}
    for key, value in sd.items():
        leaf = value.detach().float().clone()
        if official_to_upperson_key(key) is not None:
            leaf.requires_grad_(True)
        leaves[key] = leaf
    return leaves


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64-exact", "fp32"])
@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_import_matches_official_formulas_in_features_loss_and_gradients(backend: str, dtype: torch.dtype) -> None:
    """fp64 shows the maths is identical (1e-10); fp32 shows the tolerance users see."""
    tolerance = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    sd = official_state_dict()
    model = make_model(prefix_length=PREFIX, lora_rank=RANK, attention_backend=backend)
    report = upperson.import_official_state_dict(model, sd)
    assert report.petl_tensors == len(model.trainable_state_dict())
    assert report.ignored_aliases == 2 * (3 + 2)  # key+val alias per block, 3 vision + 2 text blocks
    model.to(dtype)

    images, ids, pids = sample_batch()
    images = images.to(dtype)
    image_features, text_features = model(images, ids)
    loss = upperson.losses.sdm_loss(image_features, text_features, pids)
    loss.backward()

    leaves = {key: value.to(dtype).detach().requires_grad_(value.requires_grad) for key, value in reference_leaves(sd).items()}
    spec = model.backbone_spec
    ref_image = reference.encode_image(leaves, images, spec.vision_heads)
    ref_text = reference.encode_text(leaves, ids, spec.text_heads)
    ref_loss = reference.sdm(ref_image, ref_text, pids)
    ref_loss.backward()

    torch.testing.assert_close(image_features, ref_image, **tolerance)
    torch.testing.assert_close(text_features, ref_text, **tolerance)
    torch.testing.assert_close(loss, ref_loss, **tolerance)
    ours = dict(model.named_parameters())
    compared = 0
    for key, leaf in leaves.items():
        if leaf.grad is None:
            continue
        ours_grad = ours[official_to_upperson_key(key)].grad
        # fp32 gradients reach |g| ~ 30 here; rounding scales with the tensor's largest entry
        scale = max(1.0, leaf.grad.abs().max().item()) if dtype == torch.float32 else 1.0
        torch.testing.assert_close(
            ours_grad, leaf.grad, rtol=tolerance["rtol"], atol=tolerance["atol"] * scale, msg=lambda m: f"{key}: {m}"
        )
        compared += 1
    assert compared == len(model.trainable_state_dict())


def test_import_converts_fp16_to_fp32_and_ignores_aliases() -> None:
    sd = official_state_dict(half_storage=True)
    model = make_model(prefix_length=PREFIX, lora_rank=RANK)
    upperson.import_official_state_dict(model, sd)
    prefix = model.clip.visual.transformer.resblocks[1].attn.prefix
    assert prefix.key_tokens.dtype == torch.float32
    expected = sd["vit_prefix_learner.vit_prefix.1.key.tokens"].float()
    assert torch.equal(prefix.key_tokens.detach(), expected)


def test_import_rejects_a_checkpoint_with_another_config() -> None:
    sd = official_state_dict()
    model = make_model(prefix_length=PREFIX + 1, lora_rank=RANK)
    with pytest.raises(ValueError, match="prefix"):
        upperson.import_official_state_dict(model, sd)


def test_unknown_keys_are_reported_when_strict() -> None:
    sd = official_state_dict()
    sd["something_else.weight"] = torch.zeros(1)
    model = make_model(prefix_length=PREFIX, lora_rank=RANK)
    with pytest.raises(ValueError, match="something_else"):
        upperson.import_official_state_dict(model, sd)
    report = upperson.import_official_state_dict(model, sd, strict=False)
    assert report.unexpected == ["something_else.weight"]


def test_config_and_backbone_are_read_from_the_checkpoint() -> None:
    sd = official_state_dict()
    config = upperson.official_config_from_state_dict(sd)
    assert (config.prefix_length, config.lora_rank, config.adapter_reduction) == (PREFIX, RANK, REDUCTION)
    backbone = official_backbone_state_dict(sd)
    assert "visual.conv1.weight" in backbone and not any("adapter" in key or "scale_" in key for key in backbone)
