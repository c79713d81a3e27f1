"""Self-attention that replaces a frozen ``nn.MultiheadAttention`` and adds K/V LoRA and S-Prefix."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from upperson.petl.low_rank import KVUpdate
from upperson.petl.prefix import ScaledPrefix

AttentionBackend = Literal["sdpa", "explicit"]


class PETLAttention(nn.Module):
    """Multi-head self-attention over the frozen CLIP projections, with optional LoRA (or DoRA) and prefix.

    The frozen ``in_proj_weight`` / ``in_proj_bias`` / ``out_proj`` are the wrapped module's own
    parameters, registered under the same names, so checkpoint keys do not change on injection.

    Backends:
        ``sdpa``: LoRA as a low-rank side branch, λ folded into the prefix values, attention by
            ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels on CPU and GPU).
        ``explicit``: materialises the LoRA-updated weight and the attention matrix and scales the
            prefix columns after the softmax, exactly as the official code; for verification.
    """

    def __init__(
        self,
        attention: nn.MultiheadAttention,
        lora: KVUpdate | None = None,
        prefix: ScaledPrefix | None = None,
        backend: AttentionBackend = "sdpa",
    ) -> None:
        super().__init__()
        if not attention._qkv_same_embed_dim or attention.bias_k is not None or attention.in_proj_bias is None:
            raise ValueError("PETLAttention wraps plain self-attention with a fused, biased in-projection")
        self.num_heads = attention.num_heads
        self.batch_first = attention.batch_first
        self.in_proj_weight = attention.in_proj_weight
        self.in_proj_bias = attention.in_proj_bias
        self.out_proj = attention.out_proj
        self.lora = lora
        self.prefix = prefix
        self.backend = backend
        self.lora_merged = False

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """Same call and return convention as ``nn.MultiheadAttention`` (weights are never returned).

        Self-attention: ``key`` and ``value`` are the query tokens (or omitted). The query may also
        be a subset of the tokens given as ``key`` (``value`` the same tensor): those queries attend
        over all of them, as they would in full self-attention (used to run a last block on the
        pooled row only).
        """
        key = query if key is None else key
        if value is not None and value is not key:
            raise ValueError("PETLAttention attends over one token set: value must be the key tensor")
        x_query = query if self.batch_first else query.transpose(0, 1)  # [B, queries, width]
        x = key if self.batch_first else key.transpose(0, 1)  # [B, tokens, width]
        out = self._attend(x_query, x, attn_mask)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _attend(self, x_query: torch.Tensor, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        batch, queries, width = x_query.shape
        tokens = x.shape[1]
        heads, head_dim = self.num_heads, width // self.num_heads
        side_lora = self.lora is not None and not self.lora_merged
        weight = self.in_proj_weight
        if side_lora and self.backend == "explicit":
            weight = self.lora.updated_in_proj(weight)
        if x_query is x:
            q, k, v = F.linear(x, weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q = F.linear(x_query, weight[:width], self.in_proj_bias[:width])
            k, v = F.linear(x, weight[width:], self.in_proj_bias[width:]).chunk(2, dim=-1)
        if side_lora and self.backend == "sdpa":
            k, v = self.lora.update_key_value(x, k, v, self.in_proj_weight, self.in_proj_bias)

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], -1, heads, head_dim).transpose(1, 2)  # [B, H, tokens, head_dim]

        q, k, v = split_heads(q), split_heads(k), split_heads(v)
        if self.prefix is not None:
            prefix_values = self.prefix.scaled_values() if self.backend == "sdpa" else self.prefix.values()
            k = torch.cat([k, split_heads(self.prefix.keys()[None].to(k.dtype)).expand(batch, -1, -1, -1)], dim=2)
            v = torch.cat([v, split_heads(prefix_values[None].to(v.dtype)).expand(batch, -1, -1, -1)], dim=2)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, self.prefix.length))  # prefix columns visible to every query
        if self.backend == "sdpa":
            mask = attn_mask.to(q.dtype) if attn_mask is not None else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = self._explicit_attention(q, k, v, attn_mask, tokens)
        out = out.transpose(1, 2).reshape(batch, queries, width)
        return self.out_proj(out)

    def _explicit_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, tokens: int
    ) -> torch.Tensor:
        """``tokens``: how many key columns come from the input (the rest are prefix columns)."""
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # [B, H, tokens, tokens + L]
        if attn_mask is not None:
            scores = scores + attn_mask.to(scores.dtype)
        probs = scores.softmax(dim=-1)
        if self.prefix is not None:
            scale = self.prefix.attention_scale.to(probs.dtype)
            probs = torch.cat([probs[..., :tokens], probs[..., tokens:] * scale], dim=-1)
        return probs @ v

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold the LoRA (or DoRA) update into the frozen in-projection (inference: no side branch)."""
        if self.lora is not None and not self.lora_merged:
            self.lora.merge_(self.in_proj_weight)
            self.lora_merged = True

    @torch.no_grad()
    def unmerge_lora(self) -> None:
        """Undo :meth:`merge_lora` so LoRA trains again as a side branch."""
        if self.lora is not None and self.lora_merged:
            self.lora.unmerge_(self.in_proj_weight)
            self.lora_merged = False
