"""Official-layout import: features, SDM loss and every gradient equal the spec's formulas."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL_IMAGE, make_model, sample_batch

import reference
import upperson
from upperson.backbone import load_backbone
from upperson.methods.official import official_backbone_state_dict
from upperson.methods.up_person import official_to_upperson_key

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


def reference_outputs(sd: dict[str, torch.Tensor], images, ids, pids, dtype: torch.dtype, spec) -> tuple:
    """Features, SDM loss and PETL gradients of the formula-level reference in ``dtype``."""
    leaves = {key: value.to(dtype).detach().requires_grad_(value.requires_grad) for key, value in reference_leaves(sd).items()}
    image = reference.encode_image(leaves, images.to(dtype), spec.vision_heads)
    text = reference.encode_text(leaves, ids, spec.text_heads)
    loss = reference.sdm(image, text, pids)
    loss.backward()
    grads = {key: leaf.grad for key, leaf in leaves.items() if leaf.grad is not None}
    return image.detach(), text.detach(), loss.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64-exact", "fp32"])
@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_import_matches_official_formulas_in_features_loss_and_gradients(backend: str, dtype: torch.dtype) -> None:
    """fp64 shows the maths is identical (1e-10); fp32 shows the tolerance users see.

    In fp32 the exact (fp64) reference is the target. Features and loss must be within rtol 1e-4 /
    atol 1e-5. Some gradient entries are sums of large cancelling terms (temperature 0.02 scales the
    logits by 50), so their fp32 rounding error is set by the conditioning, not by the method; for
    gradients we require our error to be at most twice that of the reference formulas computed in
    fp32 (i.e. the official computation) or within rtol 1e-4 / atol 1e-5 x the tensor's largest entry.
    """
    tolerance = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    sd = official_state_dict()
    model = make_model(prefix_length=PREFIX, lora_rank=RANK, attention_backend=backend)
    report = upperson.import_official_state_dict(model, sd)
    assert report.petl_tensors == len(model.trainable_state_dict())
    assert report.ignored_aliases == 2 * (3 + 2)  # key+val alias per block, 3 vision + 2 text blocks
    model.to(dtype)

    images, ids, pids = sample_batch()
    image_features, text_features = model(images.to(dtype), ids)
    loss = upperson.losses.sdm_loss(image_features, text_features, pids)
    loss.backward()

    spec = model.backbone_spec
    exact_image, exact_text, exact_loss, exact_grads = reference_outputs(sd, images, ids, pids, torch.float64, spec)
    same_precision_grads = exact_grads if dtype == torch.float64 else reference_outputs(sd, images, ids, pids, dtype, spec)[3]

    torch.testing.assert_close(image_features, exact_image.to(dtype), **tolerance)
    torch.testing.assert_close(text_features, exact_text.to(dtype), **tolerance)
    torch.testing.assert_close(loss, exact_loss.to(dtype), **tolerance)
    ours = dict(model.named_parameters())
    for key, exact in exact_grads.items():
        ours_grad = ours[official_to_upperson_key(key)].grad.double()
        atol = tolerance["atol"]
        if dtype == torch.float32:
            reference_error = (same_precision_grads[key].double() - exact).abs().max().item()
            atol = max(atol * max(1.0, exact.abs().max().item()), 2 * reference_error)
        torch.testing.assert_close(ours_grad, exact, rtol=tolerance["rtol"], atol=atol, msg=lambda m: f"{key}: {m}")
    assert len(exact_grads) == len(model.trainable_state_dict())


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
