"""UP-Person ablation variants (Tables VI-IX): counts, gradients, zero-init, wiring, DoRA maths, config."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_IMAGE, make_model, randomise_petl, sample_batch

from numerics import (
    assert_paths_within_rounding,
    assert_within_bound,
    elementwise_rounding_bound,
    features,
    model_sensitivity,
    tower_rounding_stages,
    training_step,
    training_step_with_gradients,
)
import upperson
from upperson.backbone import load_backbone
from upperson.backbone.loading import BackboneSpec
from upperson.config import ConfigError, load_config
from upperson.methods.up_person import AdapterPlacement
from upperson.petl import (
    BottleneckAdapter,
    KVDoRA,
    LayerNormAffine,
    PETLAttention,
    ScaledPrefix,
)

PREFIX, RANK, REDUCTION = 3, 4, 8
CUHK_CONFIG = Path(__file__).parents[1] / "configs" / "up-person" / "cuhk-pedes.yaml"

SITES: dict[str, tuple[str, str]] = {
    "parallel-ln": ("parallel L-Adapter", "parallel L-Adapter"),
    "sequential-ln": ("sequential L-Adapter", "sequential L-Adapter"),
    "ln-tuning": ("LN-tuning", "LN-tuning"),
    "sequential-mha+sequential-mlp": ("sequential adapter", "sequential adapter"),
    "parallel-mha+parallel-mlp": ("parallel adapter", "parallel adapter"),
    "parallel-ln-mha+parallel-mlp": ("parallel L-Adapter", "parallel adapter"),
    "parallel-mha+parallel-ln-mlp": ("parallel adapter", "parallel L-Adapter"),
    "sequential-mha": ("sequential adapter", "none"),
    "sequential-mlp": ("none", "sequential adapter"),
    "parallel-mha": ("parallel adapter", "none"),
    "parallel-mlp": ("none", "parallel adapter"),
    "parallel-mha+sequential-mlp": ("parallel adapter", "sequential adapter"),
    "sequential-mha+parallel-mlp": ("sequential adapter", "parallel adapter"),
}
"""What each placement puts at the MHA side and the MLP side of a block (the field's docstring)."""


def test_every_placement_is_specified_here() -> None:
    assert set(SITES) == set(get_args(AdapterPlacement))


def towers(spec: BackboneSpec) -> list[tuple[str, int, int]]:
    return [("vision", spec.vision_width, spec.vision_layers), ("text", spec.text_width, spec.text_layers)]


def adapter_params(width: int) -> int:
    """One bottleneck: down (d·h + h), up (h·d + d), scalar s."""
    hidden = width // REDUCTION
    return width * hidden + hidden + hidden * width + width + 1


def expected_counts(spec: BackboneSpec, placement: str) -> dict[str, dict[str, int]]:
    """Per encoder: trainable parameters of the adapter-side component of ``placement``, every block."""
    counts = {}
    for encoder, width, layers in towers(spec):
        sites = SITES[placement]
        adapters = sum(site not in ("none", "LN-tuning") for site in sites)
        tuned_norms = sum(site == "LN-tuning" for site in sites)
        counts[encoder] = {"adapter": layers * adapters * adapter_params(width), "ln": layers * tuned_norms * 2 * width}
    return counts


def assert_gradients_exactly_on_trainable(model: upperson.RetrievalModel) -> None:
    """Every trainable tensor gets a non-zero gradient, nothing else gets one."""
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable == {n for n, t in model.trainable_state_dict().items() if t.requires_grad}
    assert all(p.grad.abs().sum() > 0 for p in model.parameters() if p.grad is not None)


@pytest.fixture(scope="module")
def clip_features() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """Frozen CLIP's fp32 features, and its float64 features with their rounding sensitivity (tests/numerics.py)."""
    clip = load_backbone("tiny", SMALL_IMAGE).clip
    images, ids, _ = sample_batch(batch=2)
    inputs = {"images": images, "ids": ids}
    exact, sensitivity = model_sensitivity(clip, features, inputs)
    with torch.no_grad():
        return features(clip, inputs), exact, sensitivity


def assert_equals_frozen_clip(model: upperson.RetrievalModel, clip_features) -> None:
    """The PETL terms add exact zeros (or W' = m ⊙ W0/‖W0‖ with m = ‖W0‖), but the attention backend and the
    exact shortcuts are other fp32 kernels: ours and open_clip's within ROUNDING_STAGES x S of CLIP in float64."""
    clip, exact, sensitivity = clip_features
    images, ids, _ = sample_batch(batch=2)
    with torch.no_grad():
        ours = features(model, {"images": images, "ids": ids})
    assert_paths_within_rounding({"ours": ours, "open_clip": clip}, exact, sensitivity)


@pytest.mark.parametrize("placement", list(SITES))
def test_adapter_placement_counts_gradients_and_init(placement: str, clip_features) -> None:
    model = make_model(adapter_placement=placement, prefix=False, lora=False)
    report = model.parameter_report()
    expected = expected_counts(model.backbone_spec, placement)
    for encoder in ("vision", "text"):
        assert report.breakdown[encoder].get("adapter", 0) == expected[encoder]["adapter"]
        assert report.breakdown[encoder].get("ln", 0) == expected[encoder]["ln"]
    assert report.trainable == sum(sum(counts.values()) for counts in expected.values())
    assert set(model.backbone_state_dict()) == set(load_backbone("tiny", SMALL_IMAGE).clip.state_dict())  # CLIP keys kept
    assert all(isinstance(m, (BottleneckAdapter, LayerNormAffine)) for m in model.petl_modules())

    assert_equals_frozen_clip(model, clip_features)  # zero-init up projections / copied LN affine

    randomise_petl(model)
    images, ids, pids = sample_batch(batch=2)
    upperson.losses.sdm_loss(*model(images, ids), pids).backward()
    assert_gradients_exactly_on_trainable(model)


def bottleneck(adapter: BottleneckAdapter, z: torch.Tensor) -> torch.Tensor:
    """``s · (W_up ReLU(W_down z + b_down) + b_up)`` written out."""
    hidden = torch.relu(z @ adapter.down.weight.T + adapter.down.bias)
    return adapter.scale * (hidden @ adapter.up.weight.T + adapter.up.bias)


def reference_sublayer(site: str, x: torch.Tensor, norm: torch.nn.Module, f, adapter: torch.nn.Module | None) -> torch.Tensor:
    """``x + branch`` for one sublayer ``f`` with the frozen LayerNorm ``norm`` and the site's PETL part."""
    gain, shift = norm.weight, norm.bias
    if site == "LN-tuning":
        gain, shift = adapter.weight, adapter.bias
    normed = F.layer_norm(x, gain.shape, gain, shift, norm.eps)
    if site == "parallel L-Adapter":
        return x + f(normed + bottleneck(adapter, x))
    if site == "sequential L-Adapter":
        return x + f(normed + bottleneck(adapter, normed))
    if site == "parallel adapter":
        return x + f(normed) + bottleneck(adapter, x)
    if site == "sequential adapter":
        branch = f(normed)
        return x + branch + bottleneck(adapter, branch)
    return x + f(normed)


def site_module(block: torch.nn.Module, site: str, norm_name: str, sublayer: str) -> torch.nn.Module | None:
    if site == "LN-tuning":
        return getattr(block, norm_name).tuned
    if "L-Adapter" in site:
        return getattr(block, norm_name).adapter
    return getattr(block, f"{sublayer}_adapter", None)


@pytest.mark.parametrize("placement", list(SITES))
def test_block_wiring_matches_the_written_out_formula(placement: str) -> None:
    model = make_model(adapter_placement=placement, prefix=False, lora=False)
    randomise_petl(model)
    block = model.clip.visual.transformer.resblocks[1]
    x = torch.randn(2, 5, model.backbone_spec.vision_width)
    mha_site, mlp_site = SITES[placement]
    plain_norms = load_backbone("tiny", SMALL_IMAGE).clip.visual.transformer.resblocks[1]

    def attend(h: torch.Tensor) -> torch.Tensor:
        return block.attn(h, h, h, need_weights=False)[0]

    with torch.no_grad():
        mid = reference_sublayer(mha_site, x, plain_norms.ln_1, attend, site_module(block, mha_site, "ln_1", "mha"))
        expected = reference_sublayer(mlp_site, mid, plain_norms.ln_2, block.mlp, site_module(block, mlp_site, "ln_2", "mlp"))
        ours = block(x)
    # both fp32 computations within tower_rounding_stages(1) x S of the block in float64
    exact, sensitivity = model_sensitivity(block, lambda module, inputs: {"block": module(inputs["x"])}, {"x": x})
    paths = {"block": {"block": ours}, "written-out formula": {"block": expected}}
    assert_paths_within_rounding(paths, exact, sensitivity, stages=tower_rounding_stages(1))


def test_sublayer_adapters_work_with_gradient_checkpointing() -> None:
    model = make_model(adapter_placement="parallel-mha+sequential-mlp")
    randomise_petl(model)
    _, ids, _ = sample_batch(batch=2)
    plain = model.encode_text(ids).sum()
    plain.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.clip.set_grad_checkpointing(True)
    checkpointed = model.encode_text(ids).sum()
    checkpointed.backward()
    # recomputing a forward runs the same kernels on the same inputs: bit-identical values and gradients
    assert torch.equal(checkpointed, plain)
    for name, grad in grads.items():
        assert torch.equal(dict(model.named_parameters())[name].grad, grad), name


def dora_expected_params(spec: BackboneSpec) -> int:
    """Per block: two rank-r updates (A, B, σ) + two magnitude vectors of width d."""
    return sum(layers * (2 * (2 * RANK * width + 1) + 2 * width) for _, width, layers in towers(spec))


def test_dora_counts_gradients_and_init(clip_features) -> None:
    model = make_model(lora_type="dora", prefix=False, adapter=False)
    report = model.parameter_report()
    assert report.trainable == dora_expected_params(model.backbone_spec)
    assert report.breakdown["vision"]["lora"] == 0 and report.breakdown["vision"]["dora"] > 0
    attention = model.clip.visual.transformer.resblocks[0].attn
    width = model.backbone_spec.vision_width
    frozen_kv = attention.in_proj_weight[width:].detach()
    magnitudes = torch.cat([attention.lora.key_magnitude, attention.lora.value_magnitude]).detach()
    assert torch.equal(magnitudes, frozen_kv.norm(dim=1))  # one norm per output row, over the input dim: the same kernel

    assert_equals_frozen_clip(model, clip_features)  # m = ‖W0‖ and B = 0: W' = W0

    randomise_petl(model)
    images, ids, pids = sample_batch(batch=2)
    upperson.losses.sdm_loss(*model(images, ids), pids).backward()
    assert_gradients_exactly_on_trainable(model)
    assert all(isinstance(m, KVDoRA) for m in model.petl_modules())


def hand_dora_attention(attention: PETLAttention, x: torch.Tensor) -> torch.Tensor:
    """torch's own multi-head attention run with ``W'_{k,v} = m ⊙ (W0 + σBA) / ‖W0 + σBA‖_row``."""
    width = x.shape[-1]
    dora = attention.lora
    rows = [attention.in_proj_weight[:width]]
    for index, (delta, magnitude) in enumerate(((dora.key, dora.key_magnitude), (dora.value, dora.value_magnitude)), start=1):
        direction = attention.in_proj_weight[index * width : (index + 1) * width] + delta.scale * delta.lora_b @ delta.lora_a
        rows.append(magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True))
    reference = torch.nn.MultiheadAttention(width, attention.num_heads, batch_first=True, dtype=x.dtype)
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat(rows))
        reference.in_proj_bias.copy_(attention.in_proj_bias)
        reference.out_proj.load_state_dict(attention.out_proj.state_dict())
    return reference(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_dora_matches_the_hand_computed_weight(backend: str) -> None:
    model = make_model(lora_type="dora", prefix=False, adapter=False, attention_backend=backend)
    randomise_petl(model)
    attention = model.clip.visual.transformer.resblocks[2].attn
    x = torch.randn(2, 5, model.backbone_spec.vision_width)
    with torch.no_grad():
        paths = {"ours": {"out": attention(x, x, x)[0]}, "hand-computed weight": {"out": hand_dora_attention(attention, x)}}
    exact, sensitivity = model_sensitivity(attention, lambda module, inputs: {"out": module(*[inputs["x"]] * 3)[0]}, {"x": x})
    assert_paths_within_rounding(paths, exact, sensitivity, stages=tower_rounding_stages(1))  # one attention: < one block


def dora_unmerge_bound(attention: PETLAttention, weight_before: torch.Tensor) -> torch.Tensor:
    """Rounding bound of ``W0 -> W' = (W0 + ΔW)·(m/n) -> W'·(n/m) - ΔW`` (the same ``ΔW`` and ``n`` both ways).

    Six roundings to first order, each of a value of at most ``|W0| + |ΔW|``: the sum, m/n, the
    product, n/m, the product, the difference. The Q rows are copied: bound 0.
    """
    dora = attention.lora
    with torch.no_grad():
        delta = torch.cat([torch.zeros_like(dora.key.weight()), dora.key.weight(), dora.value.weight()])
    bound = elementwise_rounding_bound(weight_before.abs() + delta.abs(), roundings=6)
    bound[: weight_before.shape[1]] = 0.0
    return bound


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_dora_merged_equals_unmerged(backend: str) -> None:
    model = make_model(lora_type="dora", attention_backend=backend)
    randomise_petl(model)
    images, ids, _ = sample_batch(batch=2)
    inputs = {"images": images, "ids": ids}
    attention = model.clip.visual.transformer.resblocks[0].attn
    weight_before = attention.in_proj_weight.detach().clone()
    exact, sensitivity = model_sensitivity(model, features, inputs)
    with torch.no_grad():
        unmerged = features(model, inputs)
        model.merge_lora()
        assert model.lora_merged
        merged = features(model, inputs)
        model.unmerge_lora()
        again = features(model, inputs)
    # all three within ROUNDING_STAGES x S of the float64 features (unmerging leaves W0 a few roundings off: an input rounding)
    assert_paths_within_rounding({"unmerged": unmerged, "merged": merged, "unmerged again": again}, exact, sensitivity)
    assert_within_bound(attention.in_proj_weight, weight_before, dora_unmerge_bound(attention, weight_before), "unmerged in_proj_weight")


def test_dora_fused_equals_explicit_in_gradients() -> None:
    fused = make_model(lora_type="dora", adapter=False)
    randomise_petl(fused)
    explicit = make_model(lora_type="dora", adapter=False, attention_backend="explicit")
    explicit.load_state_dict(fused.state_dict())
    images, ids, pids = sample_batch(batch=2)
    inputs = {"images": images, "ids": ids, "pids": pids}
    paths = {"fused": training_step_with_gradients(fused, inputs), "explicit": training_step_with_gradients(explicit, inputs)}
    # both within ROUNDING_STAGES x S of the float64 features, loss and every gradient
    exact, sensitivity = model_sensitivity(explicit, training_step, inputs, gradients_of="loss")
    assert_paths_within_rounding(paths, exact, sensitivity)


@pytest.mark.parametrize(
    "options",
    [{"lora_type": "dora"}, {"adapter_placement": "ln-tuning"}, {"adapter_placement": "parallel-mha+sequential-mlp"}],
    ids=["dora", "ln-tuning", "sublayer-adapters"],
)
def test_variants_run_under_bf16_autocast(options: dict) -> None:
    model = make_model(**options)
    randomise_petl(model)
    _, ids, _ = sample_batch(batch=2)
    with torch.no_grad():
        reference = model.encode_text(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.encode_text(ids)
    assert low.dtype == torch.float32
    assert F.cosine_similarity(low, reference).min() > 0.99


def prefix_expected_params(spec: BackboneSpec, learn_lambda: bool) -> int:
    """Per block: TK, TV [L, d], ρK, ρV, and λ when it is learned."""
    return sum(layers * (2 * PREFIX * width + 2 + learn_lambda) for _, width, layers in towers(spec))


@pytest.mark.parametrize(
    ("lambda_init", "learn_lambda"),
    [(1.0, False), (10.0, True), (50.0, True), (100.0, True)],
    ids=["vanilla", "s-prefix-10", "s-prefix-50", "s-prefix-100"],
)
def test_vanilla_prefix_and_s_prefix_lambdas_of_table_vii(lambda_init: float, learn_lambda: bool) -> None:
    model = make_model(lambda_init=lambda_init, learn_lambda=learn_lambda, lora=False, adapter=False)
    assert model.parameter_report().trainable == prefix_expected_params(model.backbone_spec, learn_lambda)
    attention = model.clip.transformer.resblocks[0].attn
    prefix: ScaledPrefix = attention.prefix
    assert prefix.attention_scale.item() == lambda_init and prefix.attention_scale.requires_grad == learn_lambda

    randomise_petl(model)
    if not learn_lambda:  # randomise_petl also moves buffers; the vanilla λ is a constant 1
        for module in model.modules():
            if isinstance(module, ScaledPrefix):
                module.attention_scale.fill_(lambda_init)
    width, heads = model.backbone_spec.text_width, model.backbone_spec.text_heads
    x = torch.randn(2, 5, width)
    q, k, v = F.linear(x, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
    keys = torch.cat([k, prefix.key_scale * prefix.key_tokens.expand(2, -1, -1)], dim=1)
    values = torch.cat([v, prefix.value_scale * prefix.value_tokens.expand(2, -1, -1)], dim=1)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(2, t.shape[1], heads, -1).transpose(1, 2)  # [B, H, tokens, head_dim]

    probs = (split(q) @ split(keys).transpose(-2, -1) / (width // heads) ** 0.5).softmax(dim=-1)
    scale = torch.ones(probs.shape[-1])
    if learn_lambda:
        scale[5:] = prefix.attention_scale  # S-Prefix: λ on the prefix columns after the softmax, no renormalising
    out = ((probs * scale) @ split(values)).transpose(1, 2).reshape(2, 5, width)
    with torch.no_grad():
        paths = {"ours": {"out": attention(x, x, x)[0]}, "written-out formula": {"out": attention.out_proj(out)}}
    exact, sensitivity = model_sensitivity(attention, lambda module, inputs: {"out": module(*[inputs["x"]] * 3)[0]}, {"x": x})
    assert_paths_within_rounding(paths, exact, sensitivity, stages=tower_rounding_stages(1))  # one attention: < one block

    images, ids, pids = sample_batch(batch=2)
    upperson.losses.sdm_loss(*model(images, ids), pids).backward()
    assert_gradients_exactly_on_trainable(model)


def test_every_variant_is_reachable_from_the_cuhk_config() -> None:
    for placement in SITES:
        config = load_config(CUHK_CONFIG, [f"model.adapter_placement={placement}"]).method_config()
        assert config.adapter_placement == placement and config.lora_type == "lora"
    config = load_config(
        CUHK_CONFIG, ["model.lora_type=dora", "model.learn_lambda=false", "model.lambda_init=1", "model.adapter=false"]
    ).method_config()
    assert (config.lora_type, config.learn_lambda, config.lambda_init, config.adapter) == ("dora", False, 1.0, False)
    with pytest.raises(ConfigError, match="adapter_placement"):
        load_config(CUHK_CONFIG, ["model.adapter_placement=parallel"])
    with pytest.raises(ConfigError, match="lora_type"):
        load_config(CUHK_CONFIG, ["model.lora_type=nope"])


@pytest.mark.parametrize(("placement", "lora_type"), [("ln-tuning", "dora"), ("parallel-ln-mha+parallel-mlp", "lora")])
def test_variant_adapter_files_round_trip(tmp_path: Path, placement: str, lora_type: str) -> None:
    trained = make_model(adapter_placement=placement, lora_type=lora_type)
    randomise_petl(trained)
    path = upperson.save_adapter(trained, tmp_path / "a.safetensors")
    fresh = make_model(adapter_placement=placement, lora_type=lora_type)
    upperson.load_adapter(fresh, path)
    for name, tensor in trained.trainable_state_dict().items():
        assert torch.equal(fresh.trainable_state_dict()[name], tensor), name
    with pytest.raises(upperson.AdapterMismatchError, match="adapter_placement"):
        upperson.load_adapter(make_model(lora_type=lora_type), path)
