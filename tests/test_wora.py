"""WoRA on K/V (Table VI): hand-computed weight, fused == explicit, DoRA at α=β=1, merge, counts, gradients, files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SMALL_IMAGE, make_model, randomise_petl, sample_batch

from numerics import (
    UNIT_ROUNDOFF,
    assert_paths_within_rounding,
    assert_within_bound,
    elementwise_rounding_bound,
    features,
    model_sensitivity,
)
import upperson
from upperson.backbone import load_backbone
from upperson.backbone.loading import BackboneSpec
from upperson.config import load_config
from upperson.petl import KVDoRA, KVLoRA, KVWoRA, PETLAttention
from upperson.petl.low_rank import build_low_rank_update

PREFIX, RANK, REDUCTION = 3, 4, 8
CUHK_CONFIG = Path(__file__).parents[1] / "configs" / "up-person" / "cuhk-pedes.yaml"
UP_PERSON_VIT_B16_TRAINABLE = 7_419_816
"""UP-Person (LoRA) on ViT-B/16, CUHK-PEDES config (checked by the slow test)."""


def towers(spec: BackboneSpec) -> list[tuple[str, int, int]]:
    return [("vision", spec.vision_width, spec.vision_layers), ("text", spec.text_width, spec.text_layers)]


def wora_layer_params(width: int, rank: int) -> int:
    """Per block, K and V each: A [r, d], B [d, r], m [d], α, β."""
    return 2 * (2 * rank * width + width + 2)


def wora_parts(model: upperson.RetrievalModel) -> list[KVWoRA]:
    return [m for m in model.modules() if isinstance(m, KVWoRA)]


def randomise_wora(wora: KVWoRA, generator: torch.Generator, alpha: float = 0.7, beta: float = 1.3) -> None:
    """Non-trivial A, B, m and α ≠ 1, β ≠ 1 (in the module's dtype)."""
    with torch.no_grad():
        for part in (wora.key, wora.value):
            for tensor in (part.lora_a, part.lora_b):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator, dtype=torch.float64))
            part.magnitude.mul_(1.0 + 0.2 * torch.rand(part.magnitude.shape, generator=generator, dtype=torch.float64))
            part.alpha.fill_(alpha)
            part.beta.fill_(beta)


def hand_wora_rows(in_proj_weight: torch.Tensor, wora: KVWoRA) -> torch.Tensor:
    """``[W_q; W'_k; W'_v]`` with ``W' = m ⊙ (β W0 + α B A) / ‖β W0 + α B A‖_row``, written out."""
    width = in_proj_weight.shape[1]
    rows = [in_proj_weight[:width]]
    for index, part in enumerate((wora.key, wora.value), start=1):
        frozen = in_proj_weight[index * width : (index + 1) * width]
        direction = part.beta * frozen + part.alpha * (part.lora_b @ part.lora_a)
        norms = (direction**2).sum(dim=1, keepdim=True).sqrt()
        rows.append(part.magnitude[:, None] * direction / norms)
    return torch.cat(rows)


def hand_attention(attention: PETLAttention, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """torch's own multi-head attention run with the hand-computed WoRA in-projection."""
    width = x.shape[-1]
    reference = torch.nn.MultiheadAttention(width, attention.num_heads, batch_first=True, dtype=x.dtype)
    with torch.no_grad():
        reference.in_proj_weight.copy_(hand_wora_rows(attention.in_proj_weight, attention.lora))
        reference.in_proj_bias.copy_(attention.in_proj_bias)
        reference.out_proj.load_state_dict(attention.out_proj.state_dict())
    return reference(x, x, x, need_weights=False, attn_mask=attn_mask)[0]


FP64_IDENTITY = 2**13 * UNIT_ROUNDOFF[torch.float64]
"""float64 checks that two formulas are the same maths: ~1e-12, thousands of fp64 roundings of O(1) values,
while any difference in the formulas (a missing α, β or norm) would show at >= 1e-3."""


@pytest.fixture(scope="module")
def clip_features() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """Frozen CLIP's fp32 features, and its float64 features with their rounding sensitivity (tests/numerics.py)."""
    clip = load_backbone("tiny", SMALL_IMAGE).clip
    images, ids, _ = sample_batch(batch=2)
    inputs = {"images": images, "ids": ids}
    exact, sensitivity = model_sensitivity(clip, features, inputs)
    with torch.no_grad():
        return features(clip, inputs), exact, sensitivity


def test_updated_in_proj_matches_the_hand_computed_weight() -> None:
    model = make_model(lora_type="wora", prefix=False, adapter=False).double()
    generator = torch.Generator().manual_seed(3)
    for tower in (model.clip.visual.transformer, model.clip.transformer):
        attention = tower.resblocks[1].attn
        randomise_wora(attention.lora, generator)
        with torch.no_grad():
            updated = attention.lora.updated_in_proj(attention.in_proj_weight)
            expected = hand_wora_rows(attention.in_proj_weight, attention.lora)
        assert updated.dtype == torch.float64
        torch.testing.assert_close(updated, expected, rtol=FP64_IDENTITY, atol=FP64_IDENTITY)
        width = attention.in_proj_weight.shape[1]
        assert torch.equal(updated[:width], attention.in_proj_weight[:width])  # Q untouched
        assert not torch.allclose(updated[width:], attention.in_proj_weight[width:])  # K, V really changed
        row_norms = updated[width:].norm(dim=1)
        magnitudes = torch.cat([attention.lora.key.magnitude, attention.lora.value.magnitude])
        torch.testing.assert_close(row_norms, magnitudes.detach(), rtol=FP64_IDENTITY, atol=FP64_IDENTITY)  # ‖W'_row‖ = m


@pytest.mark.parametrize("tower_name", ["visual", "text"])
def test_fused_equals_explicit_equals_hand_attention(tower_name: str) -> None:
    model = make_model(lora_type="wora", prefix=False, adapter=False).double()
    tower = model.clip.visual.transformer if tower_name == "visual" else model.clip.transformer
    attention = tower.resblocks[-1].attn
    randomise_wora(attention.lora, torch.Generator().manual_seed(4), alpha=0.6, beta=1.4)
    x = torch.randn(2, 5, attention.in_proj_weight.shape[1], dtype=torch.float64)
    mask = None
    if tower_name == "text":  # causal, as the text encoder attends
        mask = torch.full((5, 5), float("-inf"), dtype=torch.float64).triu(1)
    expected = hand_attention(attention, x, mask)
    outputs = {}
    with torch.no_grad():
        for backend in ("sdpa", "explicit"):
            attention.backend = backend
            outputs[backend] = attention(x, x, x, attn_mask=mask)[0]
    torch.testing.assert_close(outputs["sdpa"], expected, rtol=FP64_IDENTITY, atol=FP64_IDENTITY)
    torch.testing.assert_close(outputs["explicit"], expected, rtol=FP64_IDENTITY, atol=FP64_IDENTITY)


def test_fresh_wora_changes_nothing(clip_features) -> None:
    bare = make_model(lora_type="wora", prefix=False, adapter=False)
    for attention in (m for m in bare.modules() if isinstance(m, PETLAttention)):
        width = attention.in_proj_weight.shape[1]
        for index, part in enumerate((attention.lora.key, attention.lora.value), start=1):
            frozen = attention.in_proj_weight[index * width : (index + 1) * width]
            assert part.alpha.item() == part.beta.item() == 1.0
            assert torch.equal(part.lora_b, torch.zeros(width, RANK)) and part.lora_a.abs().sum() > 0
            assert torch.equal(part.magnitude.detach(), frozen.norm(dim=1))  # per output row, over the input dim: same kernel
    images, ids, _ = sample_batch(batch=2)
    inputs = {"images": images, "ids": ids}
    clip, exact, sensitivity = clip_features
    with torch.no_grad():
        fresh = features(bare, inputs)
    # B = 0, α = β = 1, m = ‖W0‖: W' = W0 in exact arithmetic, but m/‖W0‖ and the side branch round in fp32
    assert_paths_within_rounding({"fresh WoRA": fresh, "open_clip": clip}, exact, sensitivity)

    without_lora = make_model(lora=False)
    randomise_petl(without_lora)  # non-zero prefix and adapters, shared by both models
    with_wora = make_model(lora_type="wora")
    missing, unexpected = with_wora.load_state_dict(without_lora.state_dict(), strict=False)
    assert not unexpected
    assert set(missing) == {name for name in with_wora.trainable_state_dict() if ".lora." in name}
    assert all(isinstance(with_wora.get_submodule(name.rsplit(".", 2)[0]), KVWoRA) for name in missing)
    exact, sensitivity = model_sensitivity(without_lora, features, inputs)
    with torch.no_grad():
        paths = {"fresh WoRA": features(with_wora, inputs), "without LoRA": features(without_lora, inputs)}
    assert_paths_within_rounding(paths, exact, sensitivity)  # ROUNDING_STAGES x S of the float64 features


def test_unit_weights_equal_dora_with_the_same_factors() -> None:
    generator = torch.Generator().manual_seed(5)
    width = 16
    in_proj_weight = torch.randn(3 * width, width, generator=generator, dtype=torch.float64)
    in_proj_bias = torch.randn(3 * width, generator=generator, dtype=torch.float64)
    wora = KVWoRA(in_proj_weight, RANK).double()
    dora = KVDoRA(in_proj_weight, RANK).double()
    assert torch.equal(  # the same magnitude init: row norms of W0, the same kernel
        torch.cat([wora.key.magnitude, wora.value.magnitude]), torch.cat([dora.key_magnitude, dora.value_magnitude])
    )
    randomise_wora(wora, generator, alpha=1.0, beta=1.0)
    with torch.no_grad():
        for part, delta, magnitude in ((wora.key, dora.key, dora.key_magnitude), (wora.value, dora.value, dora.value_magnitude)):
            delta.lora_a.copy_(part.lora_a)
            delta.lora_b.copy_(part.lora_b)
            magnitude.copy_(part.magnitude)
            assert delta.scale.item() == 1.0
        ours, theirs = wora.updated_in_proj(in_proj_weight), dora.updated_in_proj(in_proj_weight)
        torch.testing.assert_close(ours, theirs, rtol=FP64_IDENTITY, atol=FP64_IDENTITY)
        x = torch.randn(2, 5, width, generator=generator, dtype=torch.float64)
        k, v = torch.nn.functional.linear(x, in_proj_weight, in_proj_bias).chunk(3, dim=-1)[1:]
        ours = wora.update_key_value(x, k, v, in_proj_weight, in_proj_bias)
        theirs = dora.update_key_value(x, k, v, in_proj_weight, in_proj_bias)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=FP64_IDENTITY, atol=FP64_IDENTITY)
        wora.key.alpha.fill_(0.5)  # and α ≠ 1 is no longer DoRA
        assert not torch.allclose(wora.updated_in_proj(in_proj_weight), dora.updated_in_proj(in_proj_weight))


def unmerge_bound(attention: PETLAttention, weight_before: torch.Tensor) -> torch.Tensor:
    """Rounding bound of ``W0 -> W' = (β·W0 + α·BA)·(m/n) -> (W'·(n/m) - α·BA) / β`` (the same ``α·BA`` and ``n`` both ways).

    Eight roundings to first order, each of a value of at most ``|W0| + |α·BA / β|`` after the
    final division: β·W0, the sum, m/n, the product, n/m, the product, the difference, /β. The Q
    rows are copied: bound 0.
    """
    width = weight_before.shape[1]
    with torch.no_grad():
        low_rank = [(part.low_rank() / part.beta).abs() for part in (attention.lora.key, attention.lora.value)]
    bound = elementwise_rounding_bound(weight_before.abs() + torch.cat([torch.zeros_like(low_rank[0]), *low_rank]), roundings=8)
    bound[:width] = 0.0
    return bound


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_merged_equals_unmerged_and_unmerge_restores_the_weight(backend: str) -> None:
    model = make_model(lora_type="wora", attention_backend=backend)
    randomise_petl(model)  # α, β = 1 + 0.3·noise, away from 1 and from 0
    scalars = [p.item() for wora in wora_parts(model) for part in (wora.key, wora.value) for p in (part.alpha, part.beta)]
    assert all(abs(value - 1.0) > 1e-3 for value in scalars)
    attentions = [m for m in model.modules() if isinstance(m, PETLAttention)]
    weights_before = [a.in_proj_weight.detach().clone() for a in attentions]
    images, ids, _ = sample_batch(batch=2)
    inputs = {"images": images, "ids": ids}
    bounds = [unmerge_bound(attention, before) for attention, before in zip(attentions, weights_before)]
    exact, sensitivity = model_sensitivity(model, features, inputs)
    with torch.no_grad():
        unmerged = features(model, inputs)
        model.merge_lora()
        assert model.lora_merged
        assert not torch.equal(attentions[0].in_proj_weight, weights_before[0])
        merged = features(model, inputs)
        model.unmerge_lora()
        assert not model.lora_merged
        again = features(model, inputs)
    # all three within ROUNDING_STAGES x S of the float64 features (unmerging leaves W0 a few roundings off: an input rounding)
    assert_paths_within_rounding({"unmerged": unmerged, "merged": merged, "unmerged again": again}, exact, sensitivity)
    for attention, before, bound in zip(attentions, weights_before, bounds):
        assert_within_bound(attention.in_proj_weight, before, bound, "unmerged in_proj_weight")
        assert attention.lora.merged_norm is None


def test_parameter_counts_match_the_closed_form() -> None:
    model = make_model(lora_type="wora", prefix=False, adapter=False)
    report = model.parameter_report()
    expected = {encoder: layers * wora_layer_params(width, RANK) for encoder, width, layers in towers(model.backbone_spec)}
    for encoder in ("vision", "text"):
        assert report.breakdown[encoder]["wora"] == expected[encoder]
        assert all(report.breakdown[encoder][other] == 0 for other in ("lora", "prefix", "adapter"))
    assert report.trainable == sum(expected.values())

    full = make_model(lora_type="wora").parameter_report()
    full_expected = 0
    for encoder, width, layers in towers(model.backbone_spec):
        hidden = width // REDUCTION
        prefix = 2 * PREFIX * width + 3  # TK, TV, ρK, ρV, λ
        adapters = 2 * (2 * width * hidden + hidden + width + 1)  # L-Adapter at ln_1 and ln_2
        assert full.breakdown[encoder]["wora"] == layers * wora_layer_params(width, RANK)
        assert full.breakdown[encoder]["prefix"] == layers * prefix and full.breakdown[encoder]["adapter"] == layers * adapters
        full_expected += layers * (prefix + adapters + wora_layer_params(width, RANK))
    assert full.trainable == full_expected
    lora = make_model(lora_type="lora").parameter_report()
    extra = sum(layers * 2 * (width + 1) for _, width, layers in towers(model.backbone_spec))  # m, β per projection
    assert full.trainable == lora.trainable + extra


def test_vit_b16_counts() -> None:
    """Both towers of ViT-B/16 (12 blocks of 768 and 12 of 512), rank 32, shapes only (meta device)."""
    rank, counts = 32, {}
    for kind, factory in (("lora", lambda w: KVLoRA(w.shape[1], rank)), ("wora", lambda w: KVWoRA(w, rank))):
        with torch.device("meta"):
            modules = [factory(torch.empty(3 * width, width)) for width in (768, 512)]
        counts[kind] = 12 * sum(p.numel() for module in modules for p in module.parameters())
    assert counts["wora"] == 12 * (wora_layer_params(768, rank) + wora_layer_params(512, rank)) == 1_996_896
    assert UP_PERSON_VIT_B16_TRAINABLE - counts["lora"] + counts["wora"] == 7_450_584


def test_only_wora_tensors_get_gradients() -> None:
    model = make_model(lora_type="wora", prefix=False, adapter=False)
    wora_ids = {id(p) for wora in wora_parts(model) for p in wora.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == wora_ids
    images, ids, pids = sample_batch(batch=2)

    upperson.losses.sdm_loss(*model(images, ids), pids).backward()  # fresh: B = 0
    assert {id(p) for p in model.parameters() if p.grad is not None} == wora_ids
    assert all(p.grad is None for p in model.backbone_state_dict().values() if isinstance(p, torch.nn.Parameter))
    for wora in wora_parts(model):
        for part in (wora.key, wora.value):
            assert part.alpha.grad.item() == 0.0  # α multiplies B·A = 0
            assert part.lora_b.grad.abs().sum() > 0

    model.zero_grad(set_to_none=True)
    randomise_petl(model)  # B ≠ 0
    upperson.losses.sdm_loss(*model(images, ids), pids).backward()
    assert {id(p) for p in model.parameters() if p.grad is not None} == wora_ids
    for wora in wora_parts(model):
        for part in (wora.key, wora.value):
            for name, tensor in part.named_parameters():
                assert tensor.grad.abs().sum() > 0, name
            assert part.alpha.grad.item() != 0.0 and part.beta.grad.item() != 0.0


def test_adapter_file_round_trip(tmp_path: Path) -> None:
    trained = make_model(lora_type="wora")
    randomise_petl(trained)
    names = set(trained.trainable_state_dict())
    assert any(name.endswith("attn.lora.key.alpha") for name in names)
    assert any(name.endswith("attn.lora.value.beta") for name in names)
    path = upperson.save_adapter(trained, tmp_path / "wora.safetensors")
    fresh = make_model(lora_type="wora")
    upperson.load_adapter(fresh, path)
    for name, tensor in trained.trainable_state_dict().items():
        assert torch.equal(fresh.trainable_state_dict()[name], tensor), name
    images, ids, _ = sample_batch(batch=2)
    with torch.no_grad():
        for a, b in zip(fresh(images, ids), trained(images, ids)):
            assert torch.equal(a, b)
    with pytest.raises(upperson.AdapterMismatchError, match="lora_type"):
        upperson.load_adapter(make_model(lora_type="dora"), path)


def test_wora_is_selectable_and_unknown_types_are_named() -> None:
    assert load_config(CUHK_CONFIG, ["model.lora_type=wora"]).method_config().lora_type == "wora"
    with pytest.raises(ValueError, match=r"lora_type must be one of dora, lora, wora; got 'nope'"):
        make_model(lora_type="nope")
    with pytest.raises(ValueError, match=r"unknown low-rank update 'nope'; available: \['dora', 'lora', 'wora'\]"):
        build_low_rank_update("nope", torch.zeros(3 * 8, 8), RANK)


def test_runs_under_bf16_autocast() -> None:
    model = make_model(lora_type="wora")
    randomise_petl(model)
    _, ids, _ = sample_batch(batch=2)
    with torch.no_grad():
        reference = model.encode_text(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.encode_text(ids)
    assert low.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(low, reference).min() > 0.99
