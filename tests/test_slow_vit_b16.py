"""Real shapes: ViT-B/16 at 384x128 (random weights), forward/backward through both backends."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise_petl, sample_batch

import upperson


@pytest.mark.slow
def test_vit_b16_at_384x128_real_shapes() -> None:
    fused = upperson.create_model("up-person", backbone="ViT-B-16-quickgelu", image_size=(384, 128), prefix_length=10, lora_rank=32)
    randomise_petl(fused)
    explicit = upperson.create_model(
        "up-person", backbone="ViT-B-16-quickgelu", image_size=(384, 128), prefix_length=10, lora_rank=32, attention_backend="explicit"
    )
    explicit.load_state_dict(fused.state_dict())
    assert fused.clip.visual.positional_embedding.shape == (193, 768)
    images, ids, pids = sample_batch(image_size=(384, 128), batch=2)
    results = []
    for model in (fused, explicit):
        image_features, text_features = model(images, ids)
        assert image_features.shape == text_features.shape == (2, 512)
        loss = upperson.losses.sdm_loss(image_features, text_features, pids)
        loss.backward()
        results.append((image_features.detach(), text_features.detach(), loss.detach()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    grads = [p.grad for p in fused.parameters() if p.requires_grad]
    assert len(grads) == 504 and all(g is not None for g in grads)
    assert fused.parameter_report().trainable == 7_419_816
