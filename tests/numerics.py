"""Where fp32 tolerances come from: the float64 response to one unit roundoff in every input.

A tolerance tuned on one CPU fails on another: AVX2, AVX-512 and AMX kernels sum in different
orders, so an fp32 result moves by a few roundings between machines. Instead of a fixed ``1e-5``,
the numerical tests bound the fp32 error of a computation by its *rounding sensitivity* ``S``:
the largest change of the float64 result when every floating input (weights, images, PETL
tensors) is multiplied by ``1 + u·r``, ``r ~ U(-1, 1)``, ``u = 2^-24`` (fp32's unit roundoff),
over a few seeded draws. ``S`` is computed in float64 on seeded draws, so it is the same number on
every CPU, and it already carries the computation's conditioning (the SDM temperature scales the
logits by 50; gradients of scalar scales are long sums with cancellation).

An fp32 evaluation rounds its inputs once (error about ``S``) and then every intermediate again.
To first order each rounding stage adds an error of the size of ``S`` (a backward-stable step is
the exact step on inputs perturbed by a few ``u``), so a graph of ``n`` stages is within ``n·S``
in the worst case where all errors align. The tiny test towers have 3 vision + 2 text blocks of
about 12 rounding stages each (2 LayerNorms, in-projection, softmax, attention-value product,
out-projection, MLP up, QuickGELU, MLP down, 2 residual sums, plus the PETL branch), so
:data:`ROUNDING_STAGES` = 64 bounds them. Measured (2026-12-07, AMD EPYC with AVX-512, native and
AVX2 kernels forced): the official formulas computed in fp32 reach 28·S on some gradient, ours 16·S.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from copy import deepcopy

import torch
from torch import nn

from upperson.losses import sdm_loss

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
"""Half an ulp at 1: the relative error of one rounding to the type."""

STAGES_PER_BLOCK = 12
"""Rounding stages of one residual block (see the module docstring)."""


def tower_rounding_stages(blocks: int) -> int:
    """First-order worst case for a graph of ``blocks`` residual blocks, plus embedding, final norm and loss."""
    return STAGES_PER_BLOCK * blocks + 4


ROUNDING_STAGES = tower_rounding_stages(3 + 2)
"""First-order worst case: rounding stages of the tiny towers (3 vision + 2 text blocks): 64."""

TRIALS = 4
"""Seeded perturbation draws; ``S`` is their maximum."""

Outputs = Mapping[str, torch.Tensor]


def _perturbed(value: torch.Tensor, u: float, generator: torch.Generator) -> torch.Tensor:
    """``value · (1 + u·r)``, ``r ~ U(-1, 1)``; ``r`` drawn in float32 (its own precision does not matter), 8x cheaper."""
    factor = torch.rand(value.shape, generator=generator, dtype=torch.float32).to(torch.float64)
    return factor.mul_(2 * u).add_(1 - u).mul_(value)


def rounding_sensitivity(
    compute: Callable[[dict[str, torch.Tensor]], Outputs],
    inputs: Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    trials: int = TRIALS,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The float64 outputs of ``compute`` and, per output, ``S`` = max |Δ| under unit-roundoff input noise.

    Args:
        compute: maps float64 inputs (same keys as ``inputs``) to named float64 outputs.
        inputs: the computation's inputs; floating ones are perturbed, the rest passed through.
        dtype: the precision whose unit roundoff the noise has.
        trials: seeded draws.

    Returns:
        ``(exact, sensitivity)``: unperturbed outputs, and the largest absolute change of each.
    """
    u = UNIT_ROUNDOFF[dtype]
    base = {key: value.double() if value.is_floating_point() else value for key, value in inputs.items()}
    exact = {key: value.detach() for key, value in compute(base).items()}
    sensitivity = dict.fromkeys(exact, 0.0)
    for trial in range(trials):
        generator = torch.Generator().manual_seed(1000 + trial)
        noisy = {key: _perturbed(value, u, generator) if value.is_floating_point() else value for key, value in base.items()}
        for key, value in compute(noisy).items():
            sensitivity[key] = max(sensitivity[key], (value.detach() - exact[key]).abs().max().item())
    return exact, sensitivity


def model_sensitivity(
    model: nn.Module,
    forward: Callable[[nn.Module, dict[str, torch.Tensor]], Outputs],
    inputs: Mapping[str, torch.Tensor],
    gradients_of: str | None = None,
    dtype: torch.dtype = torch.float32,
    trials: int = TRIALS,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """:func:`rounding_sensitivity` of ``forward(model64, inputs)``, the model's floating tensors perturbed too.

    With ``gradients_of`` (the name of a scalar output) the outputs also hold ``grad.<name>`` for
    every parameter that requires a gradient, so gradient tolerances come from the same draws.
    ``forward`` gets a float64 copy of the model; the original is untouched. Of an ``nn.Embedding``
    table only the rows the forward looks up are perturbed (the others cannot move an output; the
    49k-row token table would otherwise cost more than the forward passes).
    """
    model64 = deepcopy(model).double()
    state = {name: value for name, value in [*model64.named_parameters(), *model64.named_buffers()] if value.is_floating_point()}
    trainable = {name: value for name, value in model64.named_parameters() if value.requires_grad}
    rows = _embedding_rows(model64, forward, inputs)

    def compute(values: dict[str, torch.Tensor]) -> Outputs:
        with torch.no_grad():
            for name, tensor in state.items():
                if name in rows:
                    tensor[rows[name]] = values[f"model.{name}"]
                else:
                    tensor.copy_(values[f"model.{name}"])
        outputs = dict(forward(model64, {key: values[key] for key in inputs}))
        if gradients_of is not None:
            grads = torch.autograd.grad(outputs[gradients_of], list(trainable.values()), allow_unused=True)
            outputs.update({f"grad.{name}": grad for name, grad in zip(trainable, grads) if grad is not None})
        return outputs

    tensors = {f"model.{name}": (value[rows[name]] if name in rows else value).detach().clone() for name, value in state.items()}
    with torch.enable_grad():
        return rounding_sensitivity(compute, {**tensors, **inputs}, dtype, trials)


def _embedding_rows(
    model64: nn.Module, forward: Callable[[nn.Module, dict[str, torch.Tensor]], Outputs], inputs: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``{"<module>.weight": rows}``: the rows of each ``nn.Embedding`` that one forward looks up."""
    found: dict[str, list[torch.Tensor]] = {}
    hooks = [
        module.register_forward_hook(lambda _module, args, _output, name=name: found.setdefault(name, []).append(args[0].flatten()))
        for name, module in model64.named_modules()
        if isinstance(module, nn.Embedding)
    ]
    try:
        with torch.no_grad():
            forward(model64, {key: value.double() if value.is_floating_point() else value for key, value in inputs.items()})
    finally:
        for hook in hooks:
            hook.remove()
    return {f"{name}.weight": torch.cat(ids).unique() for name, ids in found.items()}


def rounding_tolerance(sensitivity: float, exact: torch.Tensor, dtype: torch.dtype = torch.float32, stages: int = ROUNDING_STAGES) -> float:
    """Absolute tolerance ``stages · S``, never below one rounding of the largest exact entry."""
    return max(stages * sensitivity, UNIT_ROUNDOFF[dtype] * exact.abs().max().item())


def assert_within_rounding(
    actual: torch.Tensor,
    exact: torch.Tensor,
    sensitivity: float,
    what: str,
    dtype: torch.dtype = torch.float32,
    stages: int = ROUNDING_STAGES,
) -> float:
    """``|actual - exact| <= stages · S`` elementwise (``exact`` in float64); returns error / bound."""
    atol = rounding_tolerance(sensitivity, exact, dtype, stages)
    error = (actual.double() - exact.double()).abs().max().item()
    assert error <= atol, f"{what}: error {error:.3g} exceeds {stages} x rounding sensitivity {sensitivity:.3g} (= {atol:.3g})"
    return error / atol


def assert_paths_within_rounding(
    paths: Mapping[str, Outputs],
    exact: Mapping[str, torch.Tensor],
    sensitivity: Mapping[str, float],
    stages: int = ROUNDING_STAGES,
) -> float:
    """Every output of every fp32 path (e.g. ``{"fused": ..., "explicit": ...}``) within rounding of ``exact``.

    Two fp32 computations of the same maths are not compared with each other: each is held to
    ``stages · S`` of the float64 value, so they differ by at most twice that on any CPU.
    Returns the worst error / bound.
    """
    worst = 0.0
    for path, outputs in paths.items():
        assert outputs.keys() == exact.keys(), f"{path}: outputs {sorted(outputs)} are not {sorted(exact)}"
        for name, value in outputs.items():
            worst = max(worst, assert_within_rounding(value, exact[name], sensitivity[name], f"{path} {name}", stages=stages))
    return worst


def assert_beyond_rounding(
    actual: torch.Tensor, exact: torch.Tensor, sensitivity: float, what: str, stages: int = ROUNDING_STAGES
) -> None:
    """``actual`` differs from ``exact`` by more than any fp32 rounding could explain: a real change."""
    atol = rounding_tolerance(sensitivity, exact, stages=stages)
    error = (actual.double() - exact.double()).abs().max().item()
    assert error > atol, f"{what}: differs by only {error:.3g}, within the rounding bound {atol:.3g}"


def assert_within_bound(actual: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, what: str) -> float:
    """``|actual - exact| <= bound`` elementwise, ``bound`` an a-priori rounding bound; returns the worst error / bound."""
    error = (actual.double() - exact.double()).abs()
    bound = bound.double().expand_as(error)
    worst = int((error - bound).argmax())
    assert bool((error <= bound).all()), (
        f"{what}: error {error.flatten()[worst].item():.3g} exceeds the rounding bound {bound.flatten()[worst].item():.3g}"
    )
    return (error / bound.clamp_min(torch.finfo(torch.float64).tiny)).max().item()


def elementwise_rounding_bound(magnitude: torch.Tensor, roundings: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``roundings · u · |magnitude|``: a chain of elementwise operations, each rounding a value of at most that size once."""
    return roundings * UNIT_ROUNDOFF[dtype] * magnitude.detach().double().abs()


def features(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Both towers' features: the forward most tests bound (inputs ``images``, ``ids``)."""
    return {"image": model.encode_image(inputs["images"]), "text": model.encode_text(inputs["ids"])}


def training_step(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Features and the SDM loss (inputs ``images``, ``ids``, ``pids``): pass ``gradients_of="loss"`` for gradients."""
    image, text = model(inputs["images"], inputs["ids"])
    return {"image": image, "text": text, "loss": sdm_loss(image, text, inputs["pids"])}


def training_step_with_gradients(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`training_step` run and back-propagated: outputs plus ``grad.<name>``, keyed like :func:`model_sensitivity`."""
    model.zero_grad(set_to_none=True)
    outputs = training_step(model, inputs)
    outputs["loss"].backward()
    grads = {f"grad.{name}": p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return {**{name: value.detach() for name, value in outputs.items()}, **grads}
