"""QuickGELU that keeps one tensor for backward instead of two.

OpenAI CLIP's MLP activation is ``z · sigmoid(1.702 z)``. Written as tensor operations (open_clip's
``QuickGELU``), autograd keeps both ``z`` and ``sigmoid(1.702 z)``, each four times the block width
per token: in a PETL step, where the frozen MLP weights need no gradient, that is the largest saved
activation of every block. :class:`LeanQuickGELU` computes the same forward and keeps only ``z``; the
sigmoid is recomputed in backward, which costs one elementwise pass and no matmul.
"""

from __future__ import annotations

import torch
from open_clip.transformer import QuickGELU
from torch import nn

QUICK_GELU_SLOPE = 1.702


class _QuickGELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, z: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z)
        return z * torch.sigmoid(QUICK_GELU_SLOPE * z)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (z,) = ctx.saved_tensors
        scaled = QUICK_GELU_SLOPE * z
        gate = torch.sigmoid(scaled)
        # d/dz [z·σ(az)] = σ(az) + az·σ(az)·(1 − σ(az)): grad·σ + az·(grad·σ·(1 − σ)), in five passes
        gate_slope = torch.ops.aten.sigmoid_backward(grad, gate)  # grad·σ·(1 − σ)
        return gate.mul_(grad).addcmul_(scaled, gate_slope)


class LeanQuickGELU(nn.Module):
    """Drop-in for open_clip's ``QuickGELU`` (no parameters, same outputs).

    Without gradients (inference, tracing for export) and in TorchScript it is the plain
    expression, so exporters and compilers see ordinary operations.
    """

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and torch.is_grad_enabled() and z.requires_grad:
            return self._keep_input_only(z)
        return z * torch.sigmoid(1.702 * z)

    @torch.jit.unused
    def _keep_input_only(self, z: torch.Tensor) -> torch.Tensor:
        return _QuickGELUFunction.apply(z)


def use_lean_quick_gelu(model: nn.Module) -> int:
    """Replace every open_clip ``QuickGELU`` in ``model`` by :class:`LeanQuickGELU`; returns how many."""
    replaced = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is QuickGELU:
                setattr(parent, name, LeanQuickGELU())
                replaced += 1
    return replaced
