"""``train.compile: on``: the compiled training step equals the eager one within fp32 rounding."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import make_model, randomise_petl, sample_batch

import upperson
from upperson.config import ConfigError, load_config


def step_outputs(model: upperson.RetrievalModel, images, ids, pids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    image_features, text_features = model(images, ids)
    loss = upperson.losses.sdm_loss(image_features, text_features, pids)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "backend",
    ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)],
)
def test_compiled_training_step_equals_eager(backend: str) -> None:
    if backend == "inductor" and shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("inductor's CPU kernels need a C++ compiler")
    torch._dynamo.reset()
    model = make_model()
    randomise_petl(model)
    images, ids, pids = sample_batch()
    eager_loss, eager_grads = step_outputs(model, images, ids, pids)
    model.compile(backend=backend)
    compiled_loss, compiled_grads = step_outputs(model, images, ids, pids)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        # fused kernels reassociate sums: fp32 rounding relative to the tensor's scale
        atol = 1e-4 * float(grad.abs().max()) + 1e-8
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def test_compile_setting_is_checked_at_load() -> None:
    assert load_config(overrides=["train.compile=on"]).train.compile == "on"
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(overrides=["train.compile=sometimes"])
