"""CSKT: bidirectional prompts with text↔vision coupling (BPT) and dual adapters beside the MLP (DAT).

Behaviour follows the official code as verified in ``shared/spec/cskt-and-pipeline.md`` Part A:

* every layer ``i < depth`` has ``C`` text and ``C`` vision prompt vectors and one coupling linear
  per direction; the text set is ``[text_i ; v2t_i(vision_i)]``, the vision set
  ``[t2v_i(text_i) ; vision_i]`` (2C tokens each);
* text: captions shift right by 2C after SOT (at most ``context − 2C − 2`` word tokens survive, EOT
  kept), the layer-0 set replaces positions 1..2C before the positional embedding, deeper sets
  replace the previous layer's prompt outputs; features are pooled at the shifted EOT;
* vision: the layer-0 set is appended after the patches *before* ``ln_pre``, deeper sets replace
  the last 2C tokens; the CLS token is the feature;
* DAT: ``x + MLP(ln_2(x)) + s · up(ReLU(down(ln_3(x))))`` with a new LayerNorm ``ln_3``, constant
  ``s`` (4 text, 0.1 vision) and a non-zero-initialised up-projection.

CLIP's own modules are run one by one (open_clip has no hook for inserted tokens), so the frozen
weights, masks and pooling are exactly open_clip's.
"""

from __future__ import annotations

from typing import Callable

import torch
from open_clip.model import CLIP
from open_clip.transformer import ResidualAttentionBlock, Transformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from upperson.methods.cskt.config import CSKTConfig, PromptInit
from upperson.methods.registry import MethodOptionError
from upperson.petl.dual_adapter import DualAdapter
from upperson.petl.prompts import INIT_STD, PromptBank, PromptCoupling
from upperson.tokenizer import tokenize

PROMPT_INIT_TEXT = "a photo of a person or a pedestrian"
"""The official ``ctx_init``; its first ``C`` word tokens initialise the layer-0 text prompts."""
PLACEHOLDER_ID = 343
"""Token id ("x") written where prompts go; its embedding is replaced, it only keeps EOT the argmax."""


def inject_cskt(clip: CLIP, config: CSKTConfig) -> None:
    """Attach prompt banks, coupling layers and dual adapters; CLIP's modules stay untouched."""
    text, vision = clip.transformer, clip.visual.transformer
    if config.prompts:
        layers = _prompted_layers(config, text, vision)
        text.cskt_prompts = PromptBank(text.width, config.prompt_length, layers)
        text.cskt_coupling = PromptCoupling(text.width, vision.width, layers)
        clip.visual.cskt_prompts = PromptBank(vision.width, config.prompt_length, layers)
        clip.visual.cskt_coupling = PromptCoupling(vision.width, text.width, layers)
        _init_first_text_prompts(clip, text.cskt_prompts.prompts[0], config.prompt_init)
    if config.adapters:
        for tower, scale in ((text, config.text_adapter_scale), (vision, config.vision_adapter_scale)):
            for block in tower.resblocks:
                block.cskt_adapter = DualAdapter(tower.width, config.adapter_reduction, scale)


def _prompted_layers(config: CSKTConfig, text: Transformer, vision: Transformer) -> int:
    layers = min(len(text.resblocks), len(vision.resblocks))
    if config.depth is not None and config.depth > layers:
        raise MethodOptionError("depth", f"{config.depth} exceeds the encoders' {layers} shared blocks")
    return layers if config.depth is None else config.depth


def _init_first_text_prompts(clip: CLIP, prompts: nn.Parameter, init: PromptInit) -> None:
    length = prompts.shape[0]
    word_ids = tokenize([PROMPT_INIT_TEXT])[0]
    word_ids = word_ids[1 : int(word_ids.argmax())]
    if length > len(word_ids):
        return  # more prompts than init words: random N(0, 0.02), as officially
    ids = word_ids[:length]
    with torch.no_grad():
        if init == "paper":
            prompts.copy_(clip.token_embedding.weight[ids].float())
        else:
            distinct, index = torch.unique(ids, return_inverse=True)
            table = torch.randn(len(distinct), prompts.shape[1]) * INIT_STD
            prompts.copy_(table[index])


def shift_captions(token_ids: torch.Tensor, prompt_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Make room for ``prompt_tokens`` prompts after SOT; returns the new ids and EOT positions.

    Captions whose EOT would fall off the end keep ``context − prompt_tokens − 2`` word tokens and
    end in EOT at the last position (the official 67-word limit for C = 4, context 77).
    """
    batch, context = token_ids.shape
    eot = token_ids.argmax(dim=-1)
    placeholders = torch.full((batch, prompt_tokens), PLACEHOLDER_ID, dtype=token_ids.dtype, device=token_ids.device)
    shifted = torch.cat([token_ids[:, :1], placeholders, token_ids[:, 1 : context - prompt_tokens]], dim=1)
    overflow = eot >= context - prompt_tokens
    # branch-free (no data-dependent `if`), so that torch.export / ONNX export keep it for any batch
    last = torch.where(overflow, token_ids.gather(1, eot[:, None]).squeeze(1), shifted[:, -1])  # [N]
    shifted = torch.cat([shifted[:, :-1], last[:, None]], dim=1)
    new_eot = torch.where(overflow, torch.full_like(eot, context - 1), eot + prompt_tokens)
    return shifted, new_eot


def prompt_sets(clip: CLIP) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per prompted layer: the text set ``[text ; v2t(vision)]`` and the vision set ``[t2v(text) ; vision]``."""
    text_bank, vision_bank = clip.transformer.cskt_prompts, clip.visual.cskt_prompts
    t2v, v2t = clip.transformer.cskt_coupling.layers, clip.visual.cskt_coupling.layers
    text_sets, vision_sets = [], []
    for text, vision, to_vision, to_text in zip(text_bank.prompts, vision_bank.prompts, t2v, v2t):
        text_sets.append(torch.cat([text, to_text(vision)], dim=0))
        vision_sets.append(torch.cat([to_vision(text), vision], dim=0))
    return text_sets, vision_sets


def _run_block(block: ResidualAttentionBlock, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """open_clip's block, plus the dual adapter (if any) on the post-attention stream."""
    x = x + block.ls_1(block.attention(block.ln_1(x), attn_mask=attn_mask))
    adapter = getattr(block, "cskt_adapter", None)
    out = x + block.ls_2(block.mlp(block.ln_2(x)))
    return out + adapter(x) if adapter is not None else out


def _run_tower(
    tower: Transformer,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None,
    deep_sets: list[torch.Tensor],
    replace: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    if not tower.batch_first:
        raise ValueError("CSKT needs an open_clip transformer with batch_first=True")
    for index, block in enumerate(tower.resblocks):
        if 1 <= index < len(deep_sets):
            x = replace(x, deep_sets[index].to(x.dtype).expand(x.shape[0], -1, -1))
        if tower.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(_run_block, block, x, attn_mask, use_reentrant=False)
        else:
            x = _run_block(block, x, attn_mask)
    return x


def encode_text(clip: CLIP, token_ids: torch.Tensor) -> torch.Tensor:
    """EOT features ``[N, embed_dim]`` with CSKT's prompts and adapters."""
    cast_dtype = clip.transformer.get_cast_dtype()
    bank = getattr(clip.transformer, "cskt_prompts", None)
    if bank is None:
        text_sets: list[torch.Tensor] = []
        eot = token_ids.argmax(dim=-1)
    else:
        text_sets, _ = prompt_sets(clip)
        token_ids, eot = shift_captions(token_ids, text_sets[0].shape[0])
    x = clip.token_embedding(token_ids).to(cast_dtype)
    width = text_sets[0].shape[0] if text_sets else 0

    def replace(tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens[:, :1], prompts, tokens[:, 1 + width :]], dim=1)

    if text_sets:
        x = replace(x, text_sets[0].to(cast_dtype).expand(x.shape[0], -1, -1))
    x = x + clip.positional_embedding.to(cast_dtype)
    x = _run_tower(clip.transformer, x, clip.attn_mask, text_sets, replace)
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    return clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection


def encode_image(clip: CLIP, images: torch.Tensor) -> torch.Tensor:
    """CLS features ``[N, embed_dim]`` with CSKT's prompts appended after the patches."""
    visual = clip.visual
    bank = getattr(visual, "cskt_prompts", None)
    vision_sets = prompt_sets(clip)[1] if bank is not None else []
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    width = vision_sets[0].shape[0] if vision_sets else 0

    def replace(tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens[:, : tokens.shape[1] - width], prompts], dim=1)

    if vision_sets:
        x = torch.cat([x, vision_sets[0].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x)
    x = _run_tower(visual.transformer, x, None, vision_sets, replace)
    return visual.ln_post(x[:, 0]) @ visual.proj
