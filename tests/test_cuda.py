"""Correctness on a CUDA GPU, on tiny models (seconds each): bf16 and fp16 training steps against fp32,
every SDPA kernel with the λ prefix against the explicit formula, merged == unmerged LoRA, chunked
metrics and CSKT against the CPU, and NCCL DDP against one process.

Every test is marked ``cuda`` and skipped with the reason "needs CUDA" where there is no GPU;
``benchmarks/gpu_check.py`` runs them with ``pytest -m cuda tests/test_cuda.py``.

Accuracy criterion of the kernel, CSKT and fused-vs-explicit tests: the computation under test must
be no less accurate than the baseline computed in the same precision, measured against an exact fp64
reference: ``max|got - exact| <= max(2 * max|baseline - exact|, FLOOR[precision] * scale)`` (see
:func:`assert_as_accurate`). A fixed tolerance on ``got - baseline`` would test the baseline's
rounding as much as ours (gradients through the SDM loss at temperature 0.02 sum large cancelling terms).
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import SMALL_IMAGE, make_model, randomise_petl, sample_batch
from test_metrics import random_case
from torch.nn.attention import SDPBackend, sdpa_kernel

import upperson
from upperson.config import DataConfig, RunConfig, TrainConfig
from upperson.evaluation import retrieval_metrics
from upperson.petl import PETLAttention, ScaledPrefix
from upperson.runtime import autocast, cuda_supports_bf16
from upperson.training.distributed import DistributedEnv, process_group
from upperson.training.step import backward, build_training, loss_terms, optimizer_step

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TRAIN_RTOL = {"bf16": 3e-2, "fp16": 3e-3}
"""Relative L2 error ``||low - fp32|| / ||fp32||`` allowed for the image and text features and the SDM
loss of a training step under bf16 autocast (8-bit mantissa) or fp16 autocast + GradScaler (11-bit).
The CPU's bf16 and fp16 autocast give 1.2e-2 and 1.4e-3 on the same model (the worst of the three)."""
GRAD_RTOL = {"bf16": 0.15, "fp16": 0.08}
"""Relative L2 error allowed for all PETL gradients taken as one vector. Larger than the features' because
the SDM loss divides cosine similarities by its temperature 0.02, so the rounding of the features moves
the softmax 50x more; the CPU's bf16 and fp16 autocast give 0.055 and 0.026."""
TENSOR_RTOL = 0.3
"""Relative L2 error allowed for any one gradient tensor, measured against a tenth of the largest
gradient norm of its kind (LoRA, prefix, adapter) where it is smaller: it catches a gradient that
is lost or wrong, not rounding. Tensors whose gradients are small because large terms cancel keep
the absolute error of those terms; the CPU gives at most 0.10 (bf16) and 0.12 (fp16)."""
FLOOR = {"fp32": 1e-5, "fp16": 1e-3, "bf16": 1e-2}
"""Error always accepted, relative to the scale of :func:`assert_as_accurate`. On the CPU's flash and
math kernels over 8 seeds the fused path's worst is 8e-7 (fp32) and 9e-3 (bf16, within twice the
explicit formula's own error), the unit roundoff being 6e-8 and 4e-3."""
LAMBDA = 3.0
"""λ of the kernel tests: far from 1, so a kernel that lost the prefix scaling would show."""
MAX_SKIPPED_STEPS = 12
"""GradScaler back-offs allowed before a step must go through (2^16 halved 12 times is 16)."""
DDP_WORLD = 2
DDP_TIMEOUT_S = 180
DDP_GRAD_ATOL = 1e-5
"""NCCL DDP vs one process, fp32: largest gradient difference relative to the model's largest gradient
(as ``test_distributed.GRAD_ATOL`` for Gloo)."""


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    """fp32 means fp32: TF32 convolutions (cuDNN's default) would round the patch embedding to 10 bits."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _skip_without_bf16(precision: str, device: torch.device) -> None:
    if precision == "bf16" and not cuda_supports_bf16(device):
        pytest.skip(f"{torch.cuda.get_device_name(device)} has no native bf16")


def assert_as_accurate(
    got: dict[str, torch.Tensor], baseline: dict[str, torch.Tensor], exact: dict[str, torch.Tensor], floor: float
) -> float:
    """Each ``got[name]`` is no further from ``exact[name]`` than twice ``baseline[name]`` is, or within
    ``floor`` x its scale; returns the largest error / allowed error (at most 1).

    The scale of a value (output, features, loss) is its own largest entry; that of a gradient (names
    starting with ``grad``) is the largest entry of all the gradients, as ``test_distributed`` does:
    the gradients of the scalar gates (ρK, ρV, λ, LoRA scales) are sums of many cancelling terms, so
    their rounding error is set by those terms, not by the small sum.
    """
    assert got.keys() == baseline.keys() == exact.keys()
    gradient_scale = max((t.detach().abs().max().item() for name, t in exact.items() if name.startswith("grad")), default=0.0)
    worst = 0.0
    for name, expected in exact.items():
        ours, theirs, truth = (t.detach().double().cpu() for t in (got[name], baseline[name], expected))
        scale = gradient_scale if name.startswith("grad") else truth.abs().max().item()
        error, baseline_error = (ours - truth).abs().max().item(), (theirs - truth).abs().max().item()
        allowed = max(2 * baseline_error, floor * scale)
        assert error <= allowed, f"{name}: max error {error:.3g} > {allowed:.3g} (baseline's {baseline_error:.3g}, scale {scale:.3g})"
        worst = max(worst, error / allowed if allowed else 0.0)
    return worst


def relative_error(got: torch.Tensor, reference: torch.Tensor, scale: float | None = None) -> float:
    """``||got - reference|| / max(||reference||, scale)``, in fp64."""
    got, reference = got.detach().double().cpu(), reference.detach().double().cpu()
    return ((got - reference).norm() / max(reference.norm().item(), scale or 0.0)).item()


# --- bf16 autocast and fp16 + GradScaler training steps against fp32 ---------------------------


@dataclass
class StepResult:
    features: tuple[torch.Tensor, torch.Tensor]
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    """PETL gradients of the step that was applied, unscaled (the GradScaler's factor divided out)."""
    skipped_steps: int
    """Steps the GradScaler skipped for inf/NaN gradients before one was applied (it halves its scale each time)."""
    updated: bool
    """Whether the applied optimizer step changed every PETL tensor."""


def run_training_step(precision: str, device: torch.device, state: dict[str, torch.Tensor]) -> StepResult:
    """One step exactly as the Trainer takes it (build_training, loss_terms, backward, optimizer_step).

    Under fp16 the GradScaler's first scale (2^16) can overflow the scaled fp16 gradients; the
    Trainer then skips the step and retries at half the scale, and so does this, up to
    :data:`MAX_SKIPPED_STEPS` times.
    """
    config = RunConfig(
        backbone="tiny",
        model={"prefix_length": 3, "lora_rank": 4},
        data=DataConfig(image_size=SMALL_IMAGE),
        train=TrainConfig(precision=precision),
        device=str(device),
    )
    parts = build_training(config, num_train_ids=1, device=device)
    assert parts.precision == precision and (parts.scaler is not None) == (precision == "fp16")
    parts.model.load_state_dict(state)
    images, ids, pids = (tensor.to(device) for tensor in sample_batch())
    with torch.no_grad(), autocast(device, parts.precision):
        features = parts.model(images, ids)
    trainable = {name: p for name, p in parts.model.named_parameters() if p.requires_grad}
    for skipped in range(MAX_SKIPPED_STEPS + 1):
        loss = sum(loss_terms(parts, images, ids, pids, parts.precision).values())
        backward(parts, loss)
        if parts.scaler is not None:
            parts.scaler.unscale_(parts.optimizer)  # optimizer_step's scaler.step then does not unscale again
        grads = {name: p.grad.detach().clone() for name, p in trainable.items()}
        before = {name: p.detach().clone() for name, p in trainable.items()}
        optimizer_step(parts)
        if all(grad.isfinite().all() for grad in grads.values()):
            break
    updated = all(not torch.equal(before[name], p) for name, p in trainable.items())
    return StepResult(features, loss.detach(), grads, skipped, updated)


def _randomised_state() -> dict[str, torch.Tensor]:
    """The same random PETL tensors in every process (spawned DDP workers start from a random seed)."""
    torch.manual_seed(0)
    model = make_model()
    randomise_petl(model)
    return model.state_dict()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_training_step_stays_close_to_fp32(precision: str, device: torch.device, record_property: Callable[[str, object], None]) -> None:
    _skip_without_bf16(precision, device)
    state = _randomised_state()
    reference, low = run_training_step("fp32", device, state), run_training_step(precision, device, state)
    assert reference.skipped_steps == 0 and (low.skipped_steps == 0 or precision == "fp16")
    assert low.updated and reference.updated
    errors = {
        "image features": relative_error(low.features[0], reference.features[0]),
        "text features": relative_error(low.features[1], reference.features[1]),
        "loss": relative_error(low.loss, reference.loss),
    }
    assert all(features.dtype == torch.float32 for features in low.features)
    assert low.grads.keys() == reference.grads.keys()
    names = list(reference.grads)
    flat = [torch.cat([result.grads[name].flatten() for name in names]) for result in (low, reference)]
    errors["all gradients"] = relative_error(*flat)
    kinds = {kind: [name for name in names if f".{kind}." in name] for kind in ("lora", "prefix", "adapter")}
    assert sorted(name for members in kinds.values() for name in members) == sorted(names) and all(kinds.values())
    tensor_errors = {}
    for members in kinds.values():
        largest = max(reference.grads[name].norm().item() for name in members)
        for name in members:
            tensor_errors[name] = relative_error(low.grads[name], reference.grads[name], scale=largest / 10)
    worst = max(tensor_errors, key=tensor_errors.get)
    for name, error in errors.items():
        record_property(f"relative error {name}", f"{error:.3g}")
    record_property(f"worst tensor {worst}", f"{tensor_errors[worst]:.3g}")
    record_property("GradScaler skipped steps", low.skipped_steps)
    for name in ("image features", "text features", "loss"):
        assert errors[name] <= TRAIN_RTOL[precision], f"{name}: relative error {errors[name]:.3g}"
    assert errors["all gradients"] <= GRAD_RTOL[precision], f"gradients: relative error {errors['all gradients']:.3g}"
    assert tensor_errors[worst] <= TENSOR_RTOL, f"{worst}: relative error {tensor_errors[worst]:.3g}"


# --- SDPA kernels with the λ prefix against the explicit formula ----------------------------------


KERNELS = [
    pytest.param(SDPBackend.FLASH_ATTENTION, "bf16", "vision", id="flash-bf16"),
    pytest.param(SDPBackend.FLASH_ATTENTION, "fp16", "vision", id="flash-fp16"),
    pytest.param(SDPBackend.EFFICIENT_ATTENTION, "fp32", "vision", id="efficient-fp32"),
    pytest.param(SDPBackend.EFFICIENT_ATTENTION, "bf16", "vision", id="efficient-bf16"),
    pytest.param(SDPBackend.EFFICIENT_ATTENTION, "fp32", "text", id="efficient-fp32-causal-mask"),
    pytest.param(SDPBackend.EFFICIENT_ATTENTION, "fp16", "text", id="efficient-fp16-causal-mask"),
    pytest.param(SDPBackend.MATH, "fp32", "vision", id="math-fp32"),
    pytest.param(SDPBackend.MATH, "fp32", "text", id="math-fp32-causal-mask"),
    pytest.param(SDPBackend.MATH, "bf16", "text", id="math-bf16-causal-mask"),
]
"""Flash attention takes no attention mask, so the text tower's causal mask is tested on the others."""


def model_pair() -> tuple[upperson.RetrievalModel, upperson.RetrievalModel]:
    """A fused (sdpa) and an explicit model with the same random PETL tensors and λ = :data:`LAMBDA`."""
    fused = make_model()
    randomise_petl(fused)
    with torch.no_grad():
        for module in fused.modules():
            if isinstance(module, ScaledPrefix):
                module.attention_scale.fill_(LAMBDA)
    explicit = make_model(attention_backend="explicit")
    explicit.load_state_dict(fused.state_dict())
    return fused, explicit


def first_attention(model: upperson.RetrievalModel, tower: str) -> PETLAttention:
    blocks = (model.clip.visual.transformer if tower == "vision" else model.clip.transformer).resblocks
    attention = blocks[0].attn
    assert isinstance(attention, PETLAttention) and attention.prefix is not None and attention.lora is not None
    return attention


def attention_inputs(model: upperson.RetrievalModel, tower: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[2, tokens, width]`` inputs shaped like the tower's, and its attention mask (text: causal)."""
    if tower == "vision":
        grid = [side // patch for side, patch in zip(model.backbone_spec.image_size, model.backbone_spec.patch_size)]
        shape, mask = (2, 1 + grid[0] * grid[1], model.backbone_spec.vision_width), None
    else:
        shape, mask = (2, model.backbone_spec.context_length, model.backbone_spec.text_width), model.clip.attn_mask
    return torch.randn(*shape, generator=torch.Generator().manual_seed(11)), mask


def attention_outputs(
    attention: PETLAttention, x: torch.Tensor, mask: torch.Tensor | None, precision: str, kernel: SDPBackend | None
) -> dict[str, torch.Tensor]:
    """Output and the gradients (input and every PETL tensor, λ included) of a fixed projection of it."""
    x = x.detach().requires_grad_(True)
    params = {name: p for name, p in attention.named_parameters() if p.requires_grad}
    selected = sdpa_kernel([kernel]) if kernel is not None else contextlib.nullcontext()
    with selected, autocast(x.device, precision):
        out, _ = attention(x, attn_mask=mask)
    probe = torch.linspace(-1, 1, out.numel(), device=x.device, dtype=x.dtype).reshape(out.shape)
    grads = torch.autograd.grad((out.to(x.dtype) * probe).sum(), [x, *params.values()])
    return {"output": out, "grad input": grads[0], **{f"grad {name}": g for name, g in zip(params, grads[1:])}}


@pytest.mark.parametrize("kernel,precision,tower", KERNELS)
def test_sdpa_kernel_with_prefix_matches_the_explicit_formula(
    kernel: SDPBackend, precision: str, tower: str, device: torch.device, record_property: Callable[[str, object], None]
) -> None:
    _skip_without_bf16(precision, device)
    fused_model, explicit_model = model_pair()
    fused, explicit = first_attention(fused_model, tower).to(device), first_attention(explicit_model, tower).to(device)
    exact = copy.deepcopy(explicit).double()
    x, mask = attention_inputs(fused_model, tower)
    x, mask = x.to(device), None if mask is None else mask.to(device)
    try:
        got = attention_outputs(fused, x, mask, precision, kernel)
    except RuntimeError as error:
        if "No viable backend" in str(error) or "No available kernel" in str(error):
            pytest.skip(f"{kernel.name} is not available for {precision} on {torch.cuda.get_device_name(device)}")
        raise
    baseline = attention_outputs(explicit, x, mask, precision, None)
    reference = attention_outputs(exact, x.double(), None if mask is None else mask.double(), "fp32", None)
    assert "grad prefix.attention_scale" in got
    record_property("error / allowed", f"{assert_as_accurate(got, baseline, reference, FLOOR[precision]):.3g}")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_model_matches_explicit_in_features_loss_and_gradients(precision: str, device: torch.device, record_property: Callable[[str, object], None]) -> None:
    """The whole tiny model with the kernel torch picks (flash under bf16, efficient or math in fp32)."""
    _skip_without_bf16(precision, device)
    fused, explicit = (model.to(device) for model in model_pair())
    exact = copy.deepcopy(explicit).double()
    images, ids, pids = (tensor.to(device) for tensor in sample_batch())

    def outputs(model: upperson.RetrievalModel, run_precision: str) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        inputs = images.double() if next(model.parameters()).dtype == torch.float64 else images
        with autocast(device, run_precision):
            image_features, text_features = model(inputs, ids)
        loss = upperson.losses.sdm_loss(image_features, text_features, pids)
        loss.backward()
        grads = {f"grad {n}": p.grad for n, p in model.named_parameters() if p.requires_grad}
        return {"image features": image_features, "text features": text_features, "loss": loss, **grads}

    got, baseline, reference = outputs(fused, precision), outputs(explicit, precision), outputs(exact, "fp32")
    record_property("error / allowed", f"{assert_as_accurate(got, baseline, reference, FLOOR[precision]):.3g}")


# --- merged LoRA, chunked metrics, CSKT -----------------------------------------------------------


def test_merged_lora_equals_unmerged_on_cuda(device: torch.device) -> None:
    model = make_model()
    randomise_petl(model)
    model.to(device)
    images, ids, _ = (tensor.to(device) for tensor in sample_batch())
    weight_before = model.clip.visual.transformer.resblocks[0].attn.in_proj_weight.clone()
    with torch.no_grad():
        unmerged = model(images, ids)
        model.merge_lora()
        merged = model(images, ids)
        model.unmerge_lora()
    for a, b in zip(unmerged, merged):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.clip.visual.transformer.resblocks[0].attn.in_proj_weight, weight_before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("levels", [None, 3], ids=["continuous", "ties"])
@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_chunked_metrics_on_cuda_equal_the_cpu(levels: int | None, chunk_size: int, device: torch.device) -> None:
    similarity, query_pids, gallery_pids = random_case(300, 257, 40, levels, torch.float32, seed=4)
    on_cpu = retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size=chunk_size, return_ranks=True)
    on_gpu = retrieval_metrics(
        similarity.to(device), query_pids.to(device), gallery_pids.to(device), chunk_size=chunk_size, return_ranks=True
    )
    assert torch.equal(on_gpu.pop("first_positive_rank"), on_cpu.pop("first_positive_rank"))
    assert on_gpu == pytest.approx(on_cpu, rel=1e-12, abs=1e-12)


def test_cskt_forward_and_backward_on_cuda_match_the_cpu(device: torch.device, record_property: Callable[[str, object], None]) -> None:
    """CUDA fp32 is as accurate as CPU fp32 against fp64 in features, SDM loss and every gradient."""
    model = upperson.create_model("cskt", backbone="tiny", image_size=SMALL_IMAGE, prompt_length=3)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for tensor in model.trainable_state_dict().values():
            tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    images, ids, pids = sample_batch()

    def outputs(copy_device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        run = copy.deepcopy(model).to(copy_device, dtype)
        image_features, text_features = run(images.to(copy_device, dtype), ids.to(copy_device))
        loss = upperson.losses.sdm_loss(image_features, text_features, pids.to(copy_device))
        loss.backward()
        grads = {f"grad {n}": p.grad for n, p in run.named_parameters() if p.requires_grad}
        return {"image features": image_features, "text features": text_features, "loss": loss, **grads}

    cpu = torch.device("cpu")
    got, baseline, exact = outputs(device, torch.float32), outputs(cpu, torch.float32), outputs(cpu, torch.float64)
    assert len(got) == 3 + len(model.trainable_state_dict())
    record_property("error / allowed", f"{assert_as_accurate(got, baseline, exact, FLOOR['fp32']):.3g}")


# --- NCCL DDP against one process -----------------------------------------------------------------


def ddp_config(device: torch.device) -> RunConfig:
    return RunConfig(
        backbone="tiny",
        model={"prefix_length": 3, "lora_rank": 4},
        data=DataConfig(image_size=SMALL_IMAGE),
        train=TrainConfig(precision="fp32", losses=("sdm", "id"), sdm_scope="global", batch_size=4),
        device=str(device),
    )


def _trainable_grads(parts) -> dict[str, torch.Tensor]:
    named = [*parts.model.named_parameters(), *(("objective." + n, p) for n, p in parts.objective.named_parameters())]
    return {name: p.grad.detach().cpu().clone() for name, p in named if p.requires_grad and p.grad is not None}


def ddp_worker(rank: int, port: int, out: Path, device_type: str) -> None:
    """One rank: DDP (NCCL on CUDA) on its half of the batch; rank 0 also one process on the whole batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(DDP_WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    env = DistributedEnv.from_environment()
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    state = _randomised_state()
    images, ids, pids = sample_batch()
    rows = slice(2 * rank, 2 * rank + 2)

    def gradients(distributed: DistributedEnv | None, selection: slice) -> dict[str, torch.Tensor]:
        upperson.runtime.seed_everything(0)  # the ID classifier's init
        parts = build_training(ddp_config(device), num_train_ids=3, device=device, distributed=distributed)
        parts.model.load_state_dict(state)
        terms = loss_terms(parts, images[selection].to(device), ids[selection].to(device), pids[selection].to(device), "fp32")
        sum(terms.values()).backward()
        return _trainable_grads(parts)

    with process_group(env, device):
        record = {"ddp": gradients(env, rows)}
        if rank == 0:
            record["single"] = gradients(None, slice(None))
        torch.save(record, out / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ddp(out: Path, device_type: str) -> list[dict[str, dict[str, torch.Tensor]]]:
    context = mp.start_processes(ddp_worker, args=(_free_port(), out, device_type), nprocs=DDP_WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + DDP_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"DDP workers did not finish within {DDP_TIMEOUT_S} s")
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(DDP_WORLD)]


def assert_ddp_equals_one_process(records: list[dict[str, dict[str, torch.Tensor]]]) -> None:
    expected = records[0]["single"]
    assert any(name.startswith("objective.") for name in expected) and any(".lora." in name for name in expected)
    tolerance = DDP_GRAD_ATOL * max(grad.abs().max().item() for grad in expected.values())
    for rank, record in enumerate(records):
        assert record["ddp"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(record["ddp"][name], grad, rtol=0, atol=tolerance, msg=f"rank {rank} {name}")


def test_nccl_ddp_equals_one_process_on_the_global_batch(tmp_path: Path) -> None:
    """train.sdm_scope=global over NCCL: every rank's gradient (after DDP's mean) is the single-process one."""
    if torch.cuda.device_count() < DDP_WORLD:
        pytest.skip(f"needs {DDP_WORLD} GPUs (found {torch.cuda.device_count()})")
    assert_ddp_equals_one_process(run_ddp(tmp_path, "cuda"))
