"""S-Prefix: learned prefix keys/values whose attention is scaled by λ (UP-Person §IV-C)."""

from __future__ import annotations

import torch
from torch import nn

from upperson.petl.base import PETLModule

PREFIX_TOKEN_INIT_HIGH = 0.01
"""Prefix tokens start as U(0, 0.01), as in the official code."""


class ScaledPrefix(PETLModule):
    """Prefix keys ``ρK·TK`` and values ``ρV·TV`` for one attention layer, plus the scale λ.

    The tokens enter attention directly as keys and values (no in-projection, no bias), shared by
    every sample. λ multiplies the prefix columns of the post-softmax attention matrix without
    renormalising; :meth:`scaled_values` folds λ into the values, which is the same product and lets
    fused attention kernels run.

    Args:
        width: attention width.
        length: number of prefix tokens L.
        lambda_init: initial λ (paper 10, official final commit 100).
        learn_lambda: False freezes λ at ``lambda_init`` (1.0 gives the vanilla prefix).
    """

    component = "prefix"

    def __init__(self, width: int, length: int, lambda_init: float, learn_lambda: bool = True) -> None:
        super().__init__()
        self.lambda_init = lambda_init
        self.key_tokens = nn.Parameter(torch.empty(length, width))
        self.value_tokens = nn.Parameter(torch.empty(length, width))
        self.key_scale = nn.Parameter(torch.empty(()))
        self.value_scale = nn.Parameter(torch.empty(()))
        if learn_lambda:
            self.attention_scale = nn.Parameter(torch.empty(()))
        else:
            self.register_buffer("attention_scale", torch.empty(()))
        self.reset_parameters()

    @property
    def length(self) -> int:
        return self.key_tokens.shape[0]

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.key_tokens, 0.0, PREFIX_TOKEN_INIT_HIGH)
        nn.init.uniform_(self.value_tokens, 0.0, PREFIX_TOKEN_INIT_HIGH)
        nn.init.ones_(self.key_scale)
        nn.init.ones_(self.value_scale)
        with torch.no_grad():
            self.attention_scale.fill_(self.lambda_init)

    def keys(self) -> torch.Tensor:
        """``[L, width]`` prefix keys ``ρK · TK``."""
        return self.key_scale * self.key_tokens

    def values(self) -> torch.Tensor:
        """``[L, width]`` prefix values ``ρV · TV`` (without λ)."""
        return self.value_scale * self.value_tokens

    def scaled_values(self) -> torch.Tensor:
        """``[L, width]`` values ``λ · ρV · TV``: λ on the values equals λ on the attention columns."""
        return self.attention_scale * self.values()
