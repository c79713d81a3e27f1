"""IRRA's MLM loss: masking labels, the cross-modal head, token features, training and resume."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import SMALL_IMAGE, make_model, randomise_petl
from numerics import assert_within_rounding, model_sensitivity
from PIL import Image
from test_training import tiny_overrides, write_cuhk_fixture
from torch.utils.data import DataLoader

import upperson
from upperson.config import ConfigError, load_config
from upperson.data import load_dataset
from upperson.data.datasets import ImageTextDataset, collate_skip_none
from upperson.data.masking import mask_caption_tokens, mask_caption_tokens_with_labels
from upperson.data.records import TrainSample
from upperson.data.transforms import build_transforms
from upperson.losses import mlm_loss
from upperson.tokenizer import MASK_TOKEN_ID
from upperson.training.loop import Trainer
from upperson.training.objective import MLM_DEPTH, MLMHead, TrainingObjective
from upperson.training.step import build_training, loss_terms

UP_PERSON_VIT_B16_TRAINABLE = 7_419_816
"""UP-Person's trainable count on ViT-B/16 (paper Table X "SDM" row: 7.4M; checked by the slow test)."""
CUHK_TRAIN_IDS = 11_003


def mlm_head_parameters(width: int, vocab: int, depth: int) -> int:
    """Closed form: cross-attention 4D²+4D, per block 12D²+13D, three LNs 6D, head D²+3D + DV+V."""
    return (5 + 12 * depth) * width**2 + (13 + 13 * depth) * width + width * vocab + vocab


CAPTIONS = [
    "a woman wearing a long red coat, black trousers and white shoes, carrying a brown bag",
    "the man has short hair and wears a blue shirt with grey shorts",
    "a young person in a yellow jacket walking with a black backpack on the shoulders",
]


def test_masking_labels_match_the_masked_ids_and_official_rates() -> None:
    ids = upperson.tokenize(CAPTIONS)
    candidates = (ids > 0) & (ids < MASK_TOKEN_ID)
    selected = masked_to_mask = kept = total = 0
    for row in range(3000):
        original = ids[row % 3]
        masked, labels = mask_caption_tokens_with_labels(original, random.Random(row))
        assert torch.equal(masked, mask_caption_tokens(original, random.Random(row)))  # same draws
        chosen = labels != 0
        assert torch.equal(labels[chosen], original[chosen])  # label = original id
        assert torch.equal(masked[~chosen], original[~chosen])  # unselected positions untouched
        assert bool(candidates[row % 3][chosen].all())  # never pad, SOT, EOT
        selected += int(chosen.sum())
        total += int(candidates[row % 3].sum())
        masked_to_mask += int((masked[chosen] == MASK_TOKEN_ID).sum())
        kept += int((masked[chosen] == original[chosen]).sum())
    assert selected / total == pytest.approx(0.15, abs=0.01)
    assert masked_to_mask / selected == pytest.approx(0.8, abs=0.02)
    assert kept / selected == pytest.approx(0.1, abs=0.02)  # random ids rarely hit the original

    masked, labels = mask_caption_tokens_with_labels(ids[0], random.Random(0), prob=0.0)
    assert labels.nonzero().flatten().tolist() == [1] and labels[1] == ids[0, 1] and masked[1] == MASK_TOKEN_ID


def make_samples(tmp_path: Path) -> list[TrainSample]:
    samples = []
    for index, caption in enumerate(CAPTIONS):
        path = tmp_path / f"{index}.jpg"
        Image.new("RGB", (16, 32), (index * 60, 0, 0)).save(path)
        samples.append(TrainSample(index, index, path, caption))
    return samples


def test_dataset_emits_mlm_items_from_the_caption_draw(tmp_path: Path) -> None:
    samples, transform = make_samples(tmp_path), build_transforms((32, 16), train=False)
    plain = ImageTextDataset(samples, transform, 0.15, seed=3)
    with_mlm = ImageTextDataset(samples, transform, 0.15, seed=3, mlm=True)
    assert "mlm_ids" not in plain[0]
    for index in range(3):
        item = with_mlm[index]
        assert torch.equal(item["caption_ids"], plain[index]["caption_ids"])  # masking unchanged by mlm
        assert torch.equal(item["mlm_ids"], item["caption_ids"])  # one draw, as UP-Person/IRRA
        assert (item["mlm_labels"] != 0).any()
    clean = ImageTextDataset(samples, transform, 0.0, seed=3, mlm=True)[1]
    assert torch.equal(clean["caption_ids"], upperson.tokenize(CAPTIONS[1])[0])
    assert not torch.equal(clean["mlm_ids"], clean["caption_ids"]) and (clean["mlm_labels"] != 0).any()
    batch = collate_skip_none([with_mlm[i] for i in range(3)])
    assert batch["mlm_ids"].shape == batch["mlm_labels"].shape == (3, 77) and batch["mlm_labels"].dtype == torch.long


def test_head_parameter_count_and_table_x_total() -> None:
    head = MLMHead(64, 1000, depth=2)
    assert sum(p.numel() for p in head.parameters()) == mlm_head_parameters(64, 1000, 2)
    with torch.device("meta"):  # ViT-B/16 shapes without allocating them
        vit_b = MLMHead(512, 49408, depth=MLM_DEPTH)
    mlm_parts = sum(p.numel() for p in vit_b.parameters())
    assert mlm_parts == mlm_head_parameters(512, 49408, MLM_DEPTH) == 39_273_216
    classifier = CUHK_TRAIN_IDS * 512 + CUHK_TRAIN_IDS
    assert round((UP_PERSON_VIT_B16_TRAINABLE + classifier) / 1e6, 1) == 13.1  # Table X: SDM + ID
    assert round((UP_PERSON_VIT_B16_TRAINABLE + classifier + mlm_parts) / 1e6, 1) == 52.3  # SDM + ID + MLM


def test_head_init_follows_irra() -> None:
    torch.manual_seed(0)
    width, depth = 256, MLM_DEPTH
    head = MLMHead(width, 2000, depth=depth)
    attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
    proj_std = attn_std * (2 * depth) ** -0.5
    block = head.cross_modal_transformer.resblocks[0]
    expected = {
        head.cross_attn.in_proj_weight: attn_std, head.cross_attn.out_proj.weight: proj_std,
        block.attn.in_proj_weight: attn_std, block.attn.out_proj.weight: proj_std,
        block.mlp.c_fc.weight: fc_std, block.mlp.c_proj.weight: proj_std,
        head.mlm_head.dense.weight: fc_std, head.mlm_head.fc.weight: proj_std,
    }
    for tensor, std in expected.items():
        assert tensor.std().item() == pytest.approx(std, rel=0.05)
    assert head.cross_attn.num_heads == width // 64 and block.attn.num_heads == width // 64
    logits = head(torch.randn(2, 77, width), torch.randn(2, 9, width))
    assert logits.shape == (2, 77, 2000)


@pytest.mark.parametrize("method", ["up-person", "full-finetune"])
def test_token_features_agree_with_pooled_features(method: str) -> None:
    model = make_model() if method == "up-person" else upperson.create_model(method, backbone="tiny", image_size=SMALL_IMAGE)
    randomise_petl(model)
    images = torch.randn(3, 3, *SMALL_IMAGE)
    ids = upperson.tokenize(CAPTIONS)
    with torch.no_grad():
        image_tokens, text_tokens = model.encode_image_tokens(images), model.encode_text_tokens(ids)
        image_features, text_features = model(images, ids)
    grid = (SMALL_IMAGE[0] // 16) * (SMALL_IMAGE[1] // 16)
    assert image_tokens.shape == (3, 1 + grid, model.backbone_spec.embed_dim)
    assert text_tokens.shape == (3, 77, model.backbone_spec.embed_dim)
    # Two fp32 paths (full towers vs the exact shortcuts) of one value: each is within
    # ROUNDING_STAGES x S of the float64 value (tests/numerics.py), so they differ by at most twice that.
    eot = ids.argmax(dim=-1)
    exact, sensitivity = model_sensitivity(
        model,
        lambda m, x: {"image": m(x["images"], ids)[0], "text": m(x["images"], ids)[1]},
        {"images": images},
    )
    for name, tokens, pooled in (("image", image_tokens[:, 0], image_features), ("text", text_tokens[torch.arange(3), eot], text_features)):
        assert_within_rounding(tokens, exact[name], sensitivity[name], f"{name} token path")
        assert_within_rounding(pooled, exact[name], sensitivity[name], f"{name} pooled path")


def test_mlm_is_rejected_for_methods_with_their_own_encoders() -> None:
    with pytest.raises(ConfigError, match="train.losses"):
        load_config(None, ["method=cskt", "train.losses=[sdm,mlm]"])
    with pytest.raises(ConfigError, match="train.losses"):
        load_config(None, ["method=zero-shot", "train.losses=[sdm,mlm]"])
    cskt = upperson.create_model("cskt", backbone="tiny", image_size=SMALL_IMAGE)
    with pytest.raises(ValueError, match="mlm"):
        cskt.encode_image_tokens(torch.randn(1, 3, *SMALL_IMAGE))
    with pytest.raises(ValueError, match="mlm"):
        cskt.encode_text_tokens(upperson.tokenize(CAPTIONS[:1]))


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cuhk_fixture(tmp_path_factory.mktemp("data"), {"train": 3, "val": 1, "test": 2})


def test_one_step_with_sdm_id_mlm_trains_the_head(fixture_root: Path, tmp_path: Path) -> None:
    config = load_config(None, tiny_overrides(fixture_root, tmp_path) + ["train.losses=[sdm,id,mlm]"])
    parts = build_training(config, num_train_ids=3, device=torch.device("cpu"))
    dataset = load_dataset("cuhk-pedes", fixture_root)
    train_set = ImageTextDataset(dataset.train, build_transforms((64, 32), train=False), 0.15, seed=1, mlm=True)
    batch = next(iter(DataLoader(train_set, batch_size=8, collate_fn=collate_skip_none)))
    terms = loss_terms(parts, batch["images"], batch["caption_ids"], batch["pids"], "fp32", batch["mlm_ids"], batch["mlm_labels"])
    assert set(terms) == {"sdm", "id", "mlm"} and all(torch.isfinite(term) for term in terms.values())
    sum(terms.values()).backward()
    head = parts.objective.mlm
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert all(p.grad is not None for p in parts.model.trainable_state_dict().values() if p.requires_grad)
    optimised = {id(p) for group in parts.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in head.parameters()} <= optimised
    assert parts.parameter_counts()["loss_head"] == parts.objective.num_parameters() == (
        mlm_head_parameters(64, 49408, MLM_DEPTH) + 3 * 64 + 3
    )
    with pytest.raises(ValueError, match="mlm_ids"):
        loss_terms(parts, batch["images"], batch["caption_ids"], batch["pids"], "fp32")
    clean_ids = upperson.tokenize([sample.caption for sample in dataset.train[:8]])  # SDM on clean captions
    with torch.no_grad():
        for precision in ("fp32", "bf16"):
            terms = loss_terms(parts, batch["images"], clean_ids, batch["pids"], precision, batch["mlm_ids"], batch["mlm_labels"])
            assert all(torch.isfinite(term) and term.dtype == torch.float32 for term in terms.values())

    # the MLM loss is IRRA's: CE over selected positions only
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[0, 3, 0, 0, 1], [0, 0, 6, 0, 0]])
    chosen = labels != 0
    expected = torch.nn.functional.cross_entropy(logits[chosen], labels[chosen])
    torch.testing.assert_close(mlm_loss(logits, labels), expected)
    assert TrainingObjective(("sdm",), 8, 3, 0.02).mlm is None


def test_resume_with_mlm_equals_uninterrupted(fixture_root: Path, tmp_path: Path) -> None:
    config = load_config(None, tiny_overrides(fixture_root, tmp_path, epochs=2) + ["train.losses=[sdm,id,mlm]", "train.id_lr_factor=5"])
    straight = Trainer(config, tmp_path / "straight").fit()
    assert Trainer(config, tmp_path / "resumed").fit(stop_after_epochs=1) is None
    resumed = Trainer(config, tmp_path / "resumed").fit(resume=True)
    assert straight.test_metrics == resumed.test_metrics
    states = [torch.load(tmp_path / run / "state.pt", weights_only=True)["objective"] for run in ("straight", "resumed")]
    assert any(key.startswith("mlm.mlm_head.") for key in states[0]) and states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])
    from safetensors.torch import load_file

    adapters = [load_file(str(tmp_path / run / "last.safetensors")) for run in ("straight", "resumed")]
    assert not any("mlm" in key for key in adapters[0])
    assert all(torch.equal(adapters[0][key], adapters[1][key]) for key in adapters[0])
    assert "loss_mlm" in (tmp_path / "straight" / "history.csv").read_text()
