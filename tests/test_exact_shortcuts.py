"""The work a training step skips must not change a number: CLS-only last block, text up to the last
EOT, QuickGELU keeping one tensor, PETL scales applied in the narrow space."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, randomise_petl, sample_batch
from open_clip.transformer import QuickGELU

from numerics import UNIT_ROUNDOFF, assert_paths_within_rounding, features, model_sensitivity
import upperson
from upperson.backbone import load_backbone
from upperson.backbone.activations import LeanQuickGELU
from upperson.methods import exact_shortcuts
from upperson.methods.exact_shortcuts import full_towers
from upperson.petl import PETLAttention

FP64_SAME_MATHS = 2**13 * UNIT_ROUNDOFF[torch.float64]
"""float64 shortcut == full: ~1e-12, thousands of fp64 roundings of O(1) values (the shortcuts drop rows and sum
the rest in another order), while a wrong shortcut (a row lost, a mask shifted) moves features by >= 1e-3."""


def fp64_model(**options) -> upperson.RetrievalModel:
    model = make_model(**options).double()
    randomise_petl(model)
    return model


def features_and_grads(model: upperson.RetrievalModel, images, ids, pids) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    image_features, text_features = model.encode_image(images), model.encode_text(ids)
    upperson.losses.sdm_loss(image_features, text_features, pids).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return image_features.detach(), text_features.detach(), grads


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_shortcuts_give_the_full_towers_features_and_every_gradient(backend: str) -> None:
    model = fp64_model(attention_backend=backend)
    images, ids, pids = sample_batch()
    images = images.double()
    fast = features_and_grads(model, images, ids, pids)
    with full_towers():
        full = features_and_grads(model, images, ids, pids)
    torch.testing.assert_close(fast[0], full[0], rtol=0, atol=FP64_SAME_MATHS)
    torch.testing.assert_close(fast[1], full[1], rtol=0, atol=FP64_SAME_MATHS)
    assert fast[2].keys() == full[2].keys() and len(fast[2]) == len(model.trainable_state_dict())
    for name in full[2]:  # gradients of scalar scales are long sums: relative to their size too
        torch.testing.assert_close(
            fast[2][name], full[2][name], rtol=FP64_SAME_MATHS, atol=FP64_SAME_MATHS, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_open_clip_features_within_fp32_rounding() -> None:
    """Shortcuts and open_clip's full forward: both within ROUNDING_STAGES x S of the float64 features."""
    model = make_model()
    randomise_petl(model)
    images, ids, _ = sample_batch()
    inputs = {"images": images, "ids": ids}
    exact, sensitivity = model_sensitivity(model, features, inputs)
    with torch.no_grad():
        paths = {"shortcuts": features(model, inputs), "open_clip": features(model.clip, inputs)}
    assert_paths_within_rounding(paths, exact, sensitivity)


def rows_seen_by_each_block(tower, run) -> list[int]:
    """Query rows of each block's attention (the input length of its out-projection)."""
    rows: list[int] = []
    hooks = [
        block.attn.out_proj.register_forward_hook(lambda _m, inputs, _o: rows.append(inputs[0].shape[-2]))
        for block in tower.resblocks
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return rows


def test_text_runs_up_to_the_batch_s_last_eot_and_the_image_last_block_on_cls_only() -> None:
    model = make_model()
    images, ids, _ = sample_batch()
    last_eot = int(ids.argmax(dim=-1).max())
    assert last_eot + 1 < ids.shape[1]
    text_rows = rows_seen_by_each_block(model.clip.transformer, lambda: model.encode_text(ids))
    assert text_rows == [last_eot + 1] * len(model.clip.transformer.resblocks)
    image_rows = rows_seen_by_each_block(model.clip.visual.transformer, lambda: model.encode_image(images))
    tokens = 1 + (images.shape[2] // 16) * (images.shape[3] // 16)
    assert image_rows == [tokens] * (len(image_rows) - 1) + [1]
    with full_towers():
        assert set(rows_seen_by_each_block(model.clip.transformer, lambda: model.encode_text(ids))) == {ids.shape[1]}
        assert set(rows_seen_by_each_block(model.clip.visual.transformer, lambda: model.encode_image(images))) == {tokens}


class TextTower(torch.nn.Module):
    def __init__(self, model: upperson.RetrievalModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(token_ids)


@pytest.mark.parametrize("tracer", ["torch.export", "torch.jit.trace"])
def test_a_traced_text_encoder_serves_every_caption_length(tracer: str) -> None:
    """Tracing (ONNX export) must not bake the example's length into the graph."""
    model = make_model().eval()
    short = upperson.tokenize(["a hat"])
    long = upperson.tokenize(["a man in a long grey coat with a brown leather bag and black shoes walking"])
    with torch.no_grad():
        if tracer == "torch.export":
            traced = torch.export.export(TextTower(model), (short,)).module()
        else:
            traced = torch.jit.trace(TextTower(model), short, check_trace=False)
        paths = {tracer: {"text": traced(long)}, "eager": {"text": model.encode_text(long)}}
    # the traced graph fuses differently (not bit-identical): both within ROUNDING_STAGES x S of the float64 features
    exact, sensitivity = model_sensitivity(model, lambda m, inputs: {"text": m.encode_text(inputs["ids"])}, {"ids": long})
    assert_paths_within_rounding(paths, exact, sensitivity)


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_attention_for_a_subset_of_queries_equals_those_rows_of_self_attention(backend: str) -> None:
    model = fp64_model(attention_backend=backend)
    attention = next(m for m in model.clip.transformer.modules() if isinstance(m, PETLAttention))
    x = torch.randn(3, 7, attention.in_proj_weight.shape[1], dtype=torch.float64)
    mask = torch.full((7, 7), float("-inf"), dtype=torch.float64).triu(1)
    full, _ = attention(x, x, x, attn_mask=mask)
    rows = [0, 4, 6]
    subset, _ = attention(x[:, rows], x, x, attn_mask=mask[rows])
    torch.testing.assert_close(subset, full[:, rows], rtol=0, atol=FP64_SAME_MATHS)
    with pytest.raises(ValueError, match="value must be the key"):
        attention(x[:, rows], x, x.clone())


def test_lean_quick_gelu_is_open_clip_s_forward_and_the_analytic_gradient() -> None:
    z = torch.linspace(-6, 6, 241, dtype=torch.float64, requires_grad=True)
    lean = LeanQuickGELU()(z)
    assert torch.equal(lean, QuickGELU()(z))  # the same expression, the same kernels
    (gradient,) = torch.autograd.grad(lean.sum(), z)
    s = 1 / (1 + torch.exp(-1.702 * z.detach()))
    # float64, |z| <= 6: a few roundings of values <= 12 (~1e-15); 1e-12 leaves room, a wrong formula is off by >= 1e-3
    torch.testing.assert_close(gradient, s + 1.702 * z.detach() * s * (1 - s), rtol=FP64_SAME_MATHS, atol=FP64_SAME_MATHS)
    assert torch.autograd.gradcheck(LeanQuickGELU(), (z[::20].detach().clone().requires_grad_(),))


def saved_bytes(function) -> int:
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(storages.values())


def test_lean_quick_gelu_keeps_one_tensor_for_backward() -> None:
    z = torch.randn(64, 256, requires_grad=True)
    assert saved_bytes(lambda: LeanQuickGELU()(z)) == z.numel() * 4
    assert saved_bytes(lambda: QuickGELU()(z)) == 2 * z.numel() * 4  # z and sigmoid(1.702 z)


def test_backbones_get_the_lean_activation_without_changing_keys() -> None:
    clip = load_backbone("tiny", (64, 32)).clip
    lean = [m for m in clip.modules() if isinstance(m, LeanQuickGELU)]
    assert len(lean) == len(clip.transformer.resblocks) + len(clip.visual.transformer.resblocks)
    assert not any(type(m) is QuickGELU for m in clip.modules())
    assert all(".gelu." not in key for key in clip.state_dict())
    torch.jit.script(clip)  # OpenAI-style TorchScript archives can still be written


def test_a_training_step_saves_far_less_than_the_full_towers() -> None:
    """Saved activations of one UP-Person forward: lean (shortcuts, one-tensor QuickGELU, narrow
    scales) against full towers with open_clip's QuickGELU; sizes are deterministic."""
    model = make_model(image_size=(128, 64))
    randomise_petl(model)
    images, ids, pids = sample_batch(image_size=(128, 64))
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def forward() -> None:
        upperson.losses.sdm_loss(model.encode_image(images), model.encode_text(ids), pids)

    def activation_bytes() -> int:
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.untyped_storage().data_ptr() not in parameters:
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            forward()
        return sum(storages.values())

    lean = activation_bytes()
    for parent in list(model.clip.modules()):
        for name, child in parent.named_children():
            if isinstance(child, LeanQuickGELU):
                setattr(parent, name, QuickGELU())
    with full_towers():
        reference = activation_bytes()
    assert lean < 0.6 * reference


def brute_force_groups(lengths: list[int], penalty: int, max_groups: int) -> float:
    """Least padded rows + penalty over every split of the sorted lengths into <= max_groups runs."""
    import itertools

    ordered = sorted(lengths)
    best = float("inf")
    for groups in range(1, max_groups + 1):
        for cuts in itertools.combinations(range(1, len(ordered)), groups - 1):
            edges = [0, *cuts, len(ordered)]
            cost = sum((b - a) * ordered[b - 1] + penalty for a, b in zip(edges, edges[1:]))
            best = min(best, cost)
    return best


def grouping_cost(lengths: list[int], bounds: list[int], penalty: int) -> float:
    cost, lower = 0.0, 0
    for bound in bounds:
        members = [length for length in lengths if lower < length <= bound]
        cost += len(members) * bound + penalty
        lower = bound
    assert sum(1 for length in lengths if length <= bounds[-1]) == len(lengths)
    return cost


@pytest.mark.parametrize("seed", range(6))
def test_length_groups_are_the_optimal_split(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (9,), generator=generator).tolist()
    for penalty in (0, 20, 60, 1000):
        bounds = exact_shortcuts.length_groups(lengths, penalty=penalty, max_groups=3)
        assert bounds == sorted(set(bounds)) and bounds[-1] == max(lengths) and len(bounds) <= 3
        assert grouping_cost(lengths, bounds, penalty) == brute_force_groups(lengths, penalty, 3)
    assert exact_shortcuts.length_groups(lengths, penalty=10**9) == [max(lengths)]


def test_captions_grouped_by_length_give_the_same_features_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exact_shortcuts, "LENGTH_GROUP_PENALTY_TOKENS", 0)  # split whenever it saves a row
    model = fp64_model()
    captions = ["a hat", "a woman in a long red coat with a black bag", "man", "grey jacket, blue jeans, white shoes"]
    ids = upperson.tokenize(captions)
    assert len(exact_shortcuts.length_groups((ids.argmax(dim=-1) + 1).tolist())) > 1
    text_parameters = [p for p in model.clip.transformer.parameters() if p.requires_grad]
    grouped = model.encode_text(ids)
    grouped_grads = torch.autograd.grad(grouped.square().sum(), text_parameters)
    with full_towers():
        full = model.encode_text(ids)
        full_grads = torch.autograd.grad(full.square().sum(), text_parameters)
    torch.testing.assert_close(grouped, full, rtol=0, atol=FP64_SAME_MATHS)
    for got, expected in zip(grouped_grads, full_grads):
        torch.testing.assert_close(got, expected, rtol=FP64_SAME_MATHS, atol=FP64_SAME_MATHS)
