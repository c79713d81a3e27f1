"""Vanilla bottleneck adapters around a whole MHA or MLP sublayer (UP-Person Tables VIII and IX).

A parallel adapter needs the sublayer's input (the pre-LN residual stream) and adds to the
sublayer's output at the same time; no single child of open_clip's block sees both, so the block's
two residual lines are re-stated here around the block's own children (same names, so the CLIP keys
do not change) instead of replacing ``ln_1`` / ``attn`` / ``ln_2`` as the L-Adapter does.
"""

from __future__ import annotations

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from upperson.petl.adapter import AdapterConnection, BottleneckAdapter


class SublayerAdaptedBlock(ResidualAttentionBlock):
    """A residual attention block with optional adapters around its MHA and MLP sublayers.

    It stays a ``ResidualAttentionBlock`` (open_clip asks ``resblocks[0]`` for its weight dtype and
    the attention call is inherited) but adopts the given block's children instead of building new
    ones, so ``ResidualAttentionBlock.__init__`` is deliberately skipped.

    With ``f`` the sublayer (LN, then MHA or MLP, then LayerScale) and ``A`` a bottleneck adapter:
        parallel (He et al.):  ``x ← x + f(x) + A(x)``   — the adapter spans the sublayer;
        sequential (Houlsby):  ``x ← x + f(x) + A(f(x))`` — the adapter follows the sublayer output.

    Args:
        block: the open_clip block; its children are adopted, not copied.
        reduction: adapter bottleneck = ``width // reduction``.
        mha: connection of the adapter around the attention sublayer, or None for none.
        mlp: connection of the adapter around the MLP sublayer, or None for none.
    """

    def __init__(
        self,
        block: ResidualAttentionBlock,
        reduction: int,
        mha: AdapterConnection | None = None,
        mlp: AdapterConnection | None = None,
    ) -> None:
        nn.Module.__init__(self)  # adopt the children below; the parent __init__ would allocate new weights
        if hasattr(block, "ln_1_kv"):
            raise ValueError("sublayer adapters support self-attention blocks only (this block has cross-attention)")
        for connection in (mha, mlp):
            if connection not in (None, "parallel", "sequential"):
                raise ValueError(f"adapter connection must be 'parallel', 'sequential' or None, got {connection!r}")
        for name, child in block.named_children():
            self.add_module(name, child)
        width = block.ln_1.normalized_shape[0]
        device = block.ln_1.weight.device
        self.mha_connection = mha
        self.mlp_connection = mlp
        self.mha_adapter = BottleneckAdapter(width, reduction).to(device) if mha else None
        self.mlp_adapter = BottleneckAdapter(width, reduction).to(device) if mlp else None

    def forward(
        self,
        q_x: torch.Tensor,
        k_x: torch.Tensor | None = None,
        v_x: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Same call as ``ResidualAttentionBlock.forward`` (which gradient checkpointing relies on)."""
        if k_x is not None or v_x is not None:
            raise ValueError("SublayerAdaptedBlock only supports self-attention (k_x and v_x must be None)")
        attended = self.ls_1(self.attention(q_x=self.ln_1(q_x), attn_mask=attn_mask))
        x = q_x + _with_adapter(self.mha_adapter, self.mha_connection, q_x, attended)
        transformed = self.ls_2(self.mlp(self.ln_2(x)))
        return x + _with_adapter(self.mlp_adapter, self.mlp_connection, x, transformed)


def _with_adapter(
    adapter: BottleneckAdapter | None, connection: AdapterConnection | None, inputs: torch.Tensor, output: torch.Tensor
) -> torch.Tensor:
    """The sublayer's residual branch with the adapter connected in parallel or in sequence."""
    if adapter is None:
        return output
    return output + adapter(inputs if connection == "parallel" else output)
