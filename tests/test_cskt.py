"""CSKT: official-layout import equals the spec's formulas; caption shift; counts; init; adapter files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SMALL_IMAGE, sample_batch

import reference
import reference_cskt
from numerics import (
    assert_beyond_rounding,
    assert_paths_within_rounding,
    assert_within_rounding,
    features,
    model_sensitivity,
    rounding_sensitivity,
)
import upperson
from upperson.backbone import load_backbone
from upperson.methods.cskt import shift_captions
from upperson.methods.cskt import cskt_config_from_state_dict, cskt_official_to_upperson_key
from upperson.methods.official import official_backbone_state_dict, official_method

PROMPTS = 3  # C: 2C = 6 prompt tokens per encoder


def make_cskt(**options) -> upperson.RetrievalModel:
    options.setdefault("prompt_length", PROMPTS)
    return upperson.create_model("cskt", backbone="tiny", image_size=SMALL_IMAGE, **options)


def official_cskt_state_dict(seed: int = 5, half_storage: bool = True) -> dict[str, torch.Tensor]:
    """A state dict laid out like the official CSKT model object (``IRRA``), random trainable tensors."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=generator)

    store = (lambda t: t.half()) if half_storage else (lambda t: t)
    clip = load_backbone("tiny", SMALL_IMAGE).clip
    sd = {f"base_model.{key}": value.clone() for key, value in clip.state_dict().items()}
    text_width, vision_width = clip.transformer.width, clip.visual.transformer.width
    depth = min(len(clip.transformer.resblocks), len(clip.visual.transformer.resblocks))
    sd["prompt_learner.ctx"] = rand(PROMPTS, text_width, scale=0.5)
    sd["prompt_learner.vision"] = rand(PROMPTS, vision_width, scale=0.5)
    sd["prompt_learner.tmap.weight"] = store(rand(vision_width, text_width, scale=0.1))
    sd["prompt_learner.tmap.bias"] = store(rand(vision_width))
    sd["prompt_learner.vmap.weight"] = store(rand(text_width, vision_width, scale=0.1))
    sd["prompt_learner.vmap.bias"] = store(rand(text_width))
    for k in range(depth - 1):
        sd[f"prompt_learner.compound_prompts_text.{k}"] = rand(PROMPTS, text_width, scale=0.5)
        sd[f"prompt_learner.compound_prompts_vision.{k}"] = rand(PROMPTS, vision_width, scale=0.5)
        sd[f"prompt_learner.compound_prompt_projections.{k}.weight"] = store(rand(vision_width, text_width, scale=0.1))
        sd[f"prompt_learner.compound_prompt_projections.{k}.bias"] = store(rand(vision_width))
        sd[f"prompt_learner.compound_prompt_projections_vision.{k}.weight"] = store(rand(text_width, vision_width, scale=0.1))
        sd[f"prompt_learner.compound_prompt_projections_vision.{k}.bias"] = store(rand(text_width))
    for tower, width in (("", text_width), ("visual.", vision_width)):
        for layer in range(len(clip.transformer.resblocks if tower == "" else clip.visual.transformer.resblocks)):
            pre = f"base_model.{tower}transformer.resblocks.{layer}."
            sd[pre + "ln_3.weight"] = 1.0 + rand(width)
            sd[pre + "ln_3.bias"] = rand(width)
            sd[pre + "adapter_mlp.down.weight"] = store(rand(width // 8, width, scale=0.2))
            sd[pre + "adapter_mlp.down.bias"] = store(rand(width // 8))
            sd[pre + "adapter_mlp.up.weight"] = store(rand(width, width // 8, scale=0.2))
            sd[pre + "adapter_mlp.up.bias"] = store(rand(width))
    return sd


def reference_outputs(sd: dict[str, torch.Tensor], images, ids, pids, dtype: torch.dtype, spec) -> tuple:
    leaves = {}
    for key, value in sd.items():
        leaf = value.detach().to(dtype).clone()
        if cskt_official_to_upperson_key(key) is not None:
            leaf.requires_grad_(True)
        leaves[key] = leaf
    image = reference_cskt.encode_image(leaves, images.to(dtype), spec.vision_heads)
    text = reference_cskt.encode_text(leaves, ids, spec.text_heads)
    loss = reference.sdm(image, text, pids)
    loss.backward()
    return image.detach(), text.detach(), loss.detach(), {k: v.grad for k, v in leaves.items() if v.grad is not None}


def reference_sensitivity(sd: dict[str, torch.Tensor], images, ids, pids, spec) -> dict[str, float]:
    """Rounding sensitivity ``S`` (tests/numerics.py) of the formula-level features, loss and CSKT gradients."""
    trainable = [key for key in sd if cskt_official_to_upperson_key(key) is not None]

    def compute(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        leaves = {key: value.detach().requires_grad_(key in trainable) for key, value in values.items() if key != "images"}
        image = reference_cskt.encode_image(leaves, values["images"], spec.vision_heads)
        text = reference_cskt.encode_text(leaves, ids, spec.text_heads)
        loss = reference.sdm(image, text, pids)
        grads = torch.autograd.grad(loss, [leaves[key] for key in trainable])
        return {"image": image, "text": text, "loss": loss, **{f"grad.{key}": grad for key, grad in zip(trainable, grads)}}

    with torch.enable_grad():
        return rounding_sensitivity(compute, {**sd, "images": images})[1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64-exact", "fp32"])
def test_import_matches_official_formulas_in_features_loss_and_gradients(dtype: torch.dtype) -> None:
    """fp64 shows the maths is identical (1e-10); fp32 shows the error users see, bounded by rounding.

    In fp32 ours and the official formulas computed in fp32 must both lie within
    ``ROUNDING_STAGES x S`` of the float64 formulas, ``S`` their response to one fp32 rounding of
    every input (tests/numerics.py): a bound from the towers' depth, the same on every CPU.
    """
    sd = official_cskt_state_dict()
    model = make_cskt()
    report = upperson.import_official_state_dict(model, sd)
    assert report.petl_tensors == len(model.trainable_state_dict())
    assert report.unexpected == [] and report.missing == []
    model.to(dtype)
    images, ids, pids = sample_batch()
    image_features, text_features = model(images.to(dtype), ids)
    loss = upperson.losses.sdm_loss(image_features, text_features, pids)
    loss.backward()
    ours = {"image": image_features, "text": text_features, "loss": loss}
    ours.update({f"grad.{key}": p.grad for key, p in official_named_parameters(model, sd).items()})

    spec = model.backbone_spec
    exact_image, exact_text, exact_loss, exact_grads = reference_outputs(sd, images, ids, pids, torch.float64, spec)
    exact = {"image": exact_image, "text": exact_text, "loss": exact_loss, **{f"grad.{k}": g for k, g in exact_grads.items()}}
    assert len(exact_grads) == len(model.trainable_state_dict())
    if dtype == torch.float64:
        for name, value in exact.items():
            torch.testing.assert_close(ours[name], value, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
        return
    sensitivity = reference_sensitivity(sd, images, ids, pids, spec)
    image32, text32, loss32, grads32 = reference_outputs(sd, images, ids, pids, torch.float32, spec)
    official = {"image": image32, "text": text32, "loss": loss32, **{f"grad.{k}": g for k, g in grads32.items()}}
    assert_paths_within_rounding({"ours": ours, "official formulas": official}, exact, sensitivity)


def official_named_parameters(model: upperson.RetrievalModel, sd: dict[str, torch.Tensor]) -> dict[str, torch.nn.Parameter]:
    """Our parameter for each official CSKT key."""
    parameters = dict(model.named_parameters())
    return {key: parameters[cskt_official_to_upperson_key(key)] for key in sd if cskt_official_to_upperson_key(key) is not None}


def test_import_reads_config_backbone_and_rejects_up_person_layout() -> None:
    sd = official_cskt_state_dict()
    assert official_method(sd) == "cskt"
    config = cskt_config_from_state_dict(sd)
    assert (config.prompt_length, config.depth, config.adapter_reduction) == (PROMPTS, 2, 8)
    backbone = official_backbone_state_dict(sd)
    assert not any("adapter_mlp" in key or "ln_3" in key for key in backbone)
    assert set(backbone) == set(load_backbone("tiny", SMALL_IMAGE).clip.state_dict())
    with pytest.raises(ValueError, match="not understood"):
        upperson.import_official_state_dict(make_cskt(prompt_length=PROMPTS), {**sd, "LORA_learner.lora_text.0.lora_A.0": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        upperson.import_official_state_dict(make_cskt(prompt_length=PROMPTS + 1), sd)


@pytest.mark.parametrize("words", [3, 66, 67, 68, 75])
def test_caption_shift_keeps_eot_and_the_67_word_limit(words: int) -> None:
    """2C = 8: EOT p -> p + 8 while p < 69 (67 words: EOT 68 -> 76); from 68 words (a 70-token caption) on, 67 survive."""
    caption = " ".join(["red"] * words)
    ids = upperson.tokenize([caption, "a man"])
    shifted, eot = shift_captions(ids, 8)
    expected = reference_cskt.rewrite_captions(ids, 8)
    assert torch.equal(shifted, expected)
    assert torch.equal(eot, expected.argmax(-1))
    original_eot = min(words + 1, 76)
    assert int(eot[0]) == (original_eot + 8 if original_eot < 69 else 76)
    assert int(eot[1]) == ids[1].argmax() + 8
    assert int((shifted[0] == ids[0, 1]).sum()) == min(words, 67)  # word tokens kept


def test_parameter_counts_match_the_closed_form() -> None:
    model = make_cskt()
    spec = model.backbone_spec
    dt, dv, c = spec.text_width, spec.vision_width, PROMPTS
    layers = min(spec.text_layers, spec.vision_layers)
    prompts = layers * c * (dt + dv)
    coupling = layers * ((dt * dv + dv) + (dv * dt + dt))

    def adapters(width: int, blocks: int) -> int:
        hidden = width // 8
        return blocks * (2 * width + (width * hidden + hidden) + (hidden * width + width))

    report = model.parameter_report()
    assert report.trainable == prompts + coupling + adapters(dt, spec.text_layers) + adapters(dv, spec.vision_layers)
    assert report.breakdown["text"]["prompts"] == layers * c * dt
    assert report.breakdown["vision"]["coupling"] == layers * (dv * dt + dt)
    assert model.parameter_report(
    ).total - report.trainable == sum(p.numel() for n, p in model.clip.named_parameters() if not p.requires_grad and n != "logit_scale")


def test_only_cskt_tensors_train_and_all_of_them_get_gradients() -> None:
    model = make_cskt()
    images, ids, pids = sample_batch()
    loss = upperson.losses.sdm_loss(*model(images, ids), pids)
    loss.backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.trainable_state_dict())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_without_prompts_and_with_silent_adapters_it_is_frozen_clip() -> None:
    """No prompts + adapters whose up-projection is zero = open_clip's encoders exactly.
    Unlike UP-Person, a fresh CSKT model is *not* frozen CLIP: the up-projection starts at N(0, 0.02)."""
    images, ids, _ = sample_batch()
    inputs = {"images": images, "ids": ids}
    clip = load_backbone("tiny", SMALL_IMAGE).clip
    exact, sensitivity = model_sensitivity(clip, features, inputs)  # CLIP's float64 features and their S
    model = make_cskt(prompts=False)
    with torch.no_grad():
        fresh = model.encode_image(images)
    assert_beyond_rounding(fresh, exact["image"], sensitivity["image"], "fresh CSKT image")  # a real change, not rounding
    with torch.no_grad():
        for name, tensor in model.trainable_state_dict().items():
            if name.endswith("up.weight") or name.endswith("up.bias"):
                tensor.zero_()
        paths = {"silent adapters": features(model, inputs), "open_clip": features(clip, inputs)}
    # the adapters add exact zeros, but the shortcuts are other fp32 kernels: ROUNDING_STAGES x S of CLIP in float64
    assert_paths_within_rounding(paths, exact, sensitivity)


def test_prompt_init_paper_uses_clip_embeddings_and_official_repeats_row_zero() -> None:
    clip = load_backbone("tiny", SMALL_IMAGE).clip
    word_ids = upperson.tokenize(["a photo of a"])[0, 1:5]
    paper = make_cskt(prompt_length=4).clip.transformer.cskt_prompts.prompts[0]
    assert torch.equal(paper, clip.token_embedding.weight[word_ids])  # a copy of the rows
    official = make_cskt(prompt_length=4, prompt_init="official").clip.transformer.cskt_prompts.prompts[0]
    assert torch.equal(official[0], official[3]) and not torch.equal(official[0], official[1])
    assert 0.01 < float(official.detach().std()) < 0.03
    assert not torch.allclose(official, clip.token_embedding.weight[word_ids])


def test_adapter_file_round_trip(tmp_path: Path) -> None:
    model = make_cskt()
    with torch.no_grad():
        for tensor in model.trainable_state_dict().values():
            tensor.add_(0.01)
    path = upperson.save_adapter(model, tmp_path / "cskt.safetensors")
    fresh = make_cskt()
    upperson.load_adapter(fresh, path)
    for name, tensor in model.trainable_state_dict().items():
        assert torch.equal(fresh.trainable_state_dict()[name], tensor), name  # fp32 written and read back
    with pytest.raises(upperson.AdapterMismatchError):
        upperson.load_adapter(upperson.create_model("up-person", backbone="tiny", image_size=SMALL_IMAGE), path)


def test_cli_converts_an_official_cskt_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from upperson.cli import main

    checkpoint = tmp_path / "cskt_official.pth"
    torch.save({"model": official_cskt_state_dict()}, checkpoint)
    out = tmp_path / "cskt.safetensors"
    assert main(["convert", str(checkpoint), "--out", str(out), "--image-size", str(SMALL_IMAGE[0]), str(SMALL_IMAGE[1])]) == 0
    assert "coupling" in capsys.readouterr().out
    model = upperson.create_model("cskt", backbone="tiny", image_size=SMALL_IMAGE, prompt_length=PROMPTS, depth=2)
    upperson.load_adapter(model, out, allow_other_backbone_weights=True)
    reference_model = make_cskt()
    upperson.import_official_state_dict(reference_model, official_cskt_state_dict())
    images, ids, _ = sample_batch()
    with torch.no_grad():  # the same weights (fp32 through the file) and the same kernels: bit-identical
        assert torch.equal(model.encode_text(ids), reference_model.encode_text(ids))
