"""CLIP features without the work that cannot reach them.

Both shortcuts give the features of open_clip's ``encode_image`` / ``encode_text`` (equal within
float rounding; tested) for less compute and less saved activation memory:

- **Image, last block on the CLS row only.** The feature is the CLS token after the last block.
  There, only the keys and values need every token; the query, the attention output, the
  out-projection and the MLP are needed for the CLS row alone. On ViT-B/16 at 384x128 (193 tokens)
  that removes about 10/12 of the last block's matmuls.
- **Text, up to the batch's last EOT.** The text tower is causal and pools at the EOT token
  (``argmax`` of the ids), so tokens after a caption's EOT never reach its feature. Running the
  tower on ``ids[:, :last_eot + 1]`` with the matching corner of the causal mask gives the same
  features; CUHK-PEDES captions end around token 20-40 of 77.

Each applies only where its premise holds (standard open_clip blocks, CLS pooling, causal argmax
text pooling, no gradient checkpointing) and not inside :func:`full_towers`; otherwise the towers run
as open_clip runs them. The text trim, whose length depends on the ids, also stays off while torch
traces (ONNX export, ``torch.compile``): a traced graph must serve every caption length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from open_clip.model import CLIP
from open_clip.transformer import ResidualAttentionBlock, Transformer, VisionTransformer
from torch import nn

from upperson.petl.attention import PETLAttention

_ENABLED: ContextVar[bool] = ContextVar("upperson_exact_shortcuts", default=True)


@contextlib.contextmanager
def full_towers() -> Iterator[None]:
    """Run every token through every block, as open_clip does (FLOP counts comparable with papers, references)."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def tracing() -> bool:
    """Whether a tracer (ONNX export, torch.export, torch.compile) is recording this call."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def image_embeddings(visual: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Patch tokens with the CLS token and positions, after ``ln_pre``: the tower's input ``[N, 1 + patches, width]``."""
    x = visual.conv1(images)  # [N, width, grid_h, grid_w]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [N, patches, width]
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.ln_pre(visual.patch_dropout(x))


def _plain_blocks(tower: Transformer) -> bool:
    return (
        getattr(tower, "batch_first", True)
        and not tower.grad_checkpointing
        and all(
            type(block) is ResidualAttentionBlock and isinstance(block.attn, (PETLAttention, nn.MultiheadAttention))
            for block in tower.resblocks
        )
    )


def image_cls_shortcut_applies(visual: nn.Module) -> bool:
    """A ViT whose feature is ``ln_post(CLS) @ proj`` after standard blocks."""
    return (
        type(visual) is VisionTransformer
        and visual.attn_pool is None
        and visual.pool_type == "tok"
        and visual.proj is not None
        and _plain_blocks(visual.transformer)
        and _ENABLED.get()
    )


def encode_image_cls(visual: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` → ``[N, embed_dim]`` unnormalised CLS features, the last block on the CLS row only."""
    x = image_embeddings(visual, images)
    *blocks, last = visual.transformer.resblocks
    for block in blocks:
        x = block(x)
    normed = last.ln_1(x)  # keys and values need every token
    cls = x[:, :1] + last.ls_1(last.attention(q_x=normed[:, :1], k_x=normed, v_x=normed))
    cls = cls + last.ls_2(last.mlp(last.ln_2(cls)))
    return visual.ln_post(cls[:, 0]) @ visual.proj


def text_trim_applies(clip: nn.Module) -> bool:
    """A causal text tower pooled at the EOT (``argmax``) token."""
    return (
        isinstance(clip, CLIP)
        and getattr(clip, "text_pool_type", "argmax") == "argmax"
        and isinstance(clip.attn_mask, torch.Tensor)
        and _plain_blocks(clip.transformer)
        and _ENABLED.get()
        and not tracing()
    )


def encode_text_trimmed(clip: CLIP, token_ids: torch.Tensor) -> torch.Tensor:
    """``[N, context]`` ids → ``[N, embed_dim]`` unnormalised EOT features, running only up to the batch's last EOT."""
    eot = token_ids.argmax(dim=-1)
    length = int(eot.max()) + 1
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(token_ids[:, :length]).to(cast_dtype)
    x = x + clip.positional_embedding[:length].to(cast_dtype)
    x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
    x = clip.ln_final(x[torch.arange(x.shape[0], device=x.device), eot])
    if isinstance(clip.text_projection, nn.Linear):
        return clip.text_projection(x)
    return x if clip.text_projection is None else x @ clip.text_projection
