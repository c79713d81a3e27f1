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

import bisect
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


LENGTH_GROUP_PENALTY_TOKENS = 512
"""A caption group is split off only when that saves more padded token rows than this (a group costs
one pass of the tower: per-call overhead and smaller, less efficient matmuls)."""
MAX_LENGTH_GROUPS = 4


def length_groups(lengths: list[int], penalty: int | None = None, max_groups: int | None = None) -> list[int]:
    """Upper length bounds of the groups that minimise padded token rows + ``penalty`` per group.

    ``lengths`` are the captions' lengths up to and including their EOT. Grouping them by length
    (each group padded to its own longest) does the same maths on fewer rows; the optimum over at
    most ``max_groups`` contiguous groups of the sorted lengths is found by dynamic programming over
    the distinct lengths (at most the context length), so it costs nothing next to the tower.
    """
    penalty = LENGTH_GROUP_PENALTY_TOKENS if penalty is None else penalty
    max_groups = MAX_LENGTH_GROUPS if max_groups is None else max_groups
    ordered = sorted(lengths)
    values = sorted(set(ordered))
    counts = [bisect.bisect_right(ordered, value) for value in values]  # captions up to each length
    best: list[list[tuple[float, int]]] = []  # best[g][b]: (cost, start) covering values[0..b] with g + 1 groups
    for groups in range(max_groups):
        row = []
        for end, value in enumerate(values):
            if groups == 0:
                row.append((counts[end] * value + penalty, 0))
                continue
            options = [
                (best[groups - 1][start - 1][0] + (counts[end] - counts[start - 1]) * value + penalty, start)
                for start in range(1, end + 1)
            ]
            row.append(min(options) if options else (float("inf"), 0))
        best.append(row)
    groups = min(range(max_groups), key=lambda g: best[g][-1][0])
    bounds, end = [], len(values) - 1
    while groups >= 0:
        bounds.append(values[end])
        end = best[groups][end][1] - 1
        groups -= 1
    return sorted(bounds)


def encode_text_trimmed(clip: CLIP, token_ids: torch.Tensor) -> torch.Tensor:
    """``[N, context]`` ids → ``[N, embed_dim]`` unnormalised EOT features.

    Each caption runs only up to its group's longest EOT: the batch is split into at most
    :data:`MAX_LENGTH_GROUPS` groups of similar length (:func:`length_groups`); one group when
    splitting would not pay.
    """
    if token_ids.shape[0] == 0:
        return clip.encode_text(token_ids, normalize=False)
    eot = token_ids.argmax(dim=-1)
    lengths = (eot + 1).tolist()
    bounds = length_groups(lengths)
    if len(bounds) == 1:
        return _encode_text_prefix(clip, token_ids, eot, bounds[0])
    members = [[] for _ in bounds]
    for row, length in enumerate(lengths):
        members[next(index for index, bound in enumerate(bounds) if length <= bound)].append(row)
    order = torch.tensor([row for group in members for row in group], device=token_ids.device)
    parts = [
        _encode_text_prefix(clip, token_ids[rows], eot[rows], bound)
        for bound, group in zip(bounds, members)
        for rows in [torch.tensor(group, device=token_ids.device)]
    ]
    return torch.cat(parts)[order.argsort()]


def _encode_text_prefix(clip: CLIP, token_ids: torch.Tensor, eot: torch.Tensor, length: int) -> torch.Tensor:
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(token_ids[:, :length]).to(cast_dtype)
    x = x + clip.positional_embedding[:length].to(cast_dtype)
    x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
    x = clip.ln_final(x[torch.arange(x.shape[0], device=x.device), eot])
    if isinstance(clip.text_projection, nn.Linear):
        return clip.text_projection(x)
    return x if clip.text_projection is None else x @ clip.text_projection


def clip_image_features(clip: CLIP, images: torch.Tensor) -> torch.Tensor:
    """open_clip's ``encode_image(images, normalize=False)``, through the CLS shortcut where it applies."""
    if image_cls_shortcut_applies(clip.visual):
        return encode_image_cls(clip.visual, images)
    return clip.encode_image(images, normalize=False)


def clip_text_features(clip: CLIP, token_ids: torch.Tensor) -> torch.Tensor:
    """open_clip's ``encode_text(token_ids, normalize=False)``, trimmed after the last EOT where that applies."""
    if text_trim_applies(clip):
        return encode_text_trimmed(clip, token_ids)
    return clip.encode_text(token_ids, normalize=False)
