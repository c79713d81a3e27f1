"""An independent, formula-level implementation of the official CSKT forward pass.

Written from ``shared/spec/cskt-and-pipeline.md`` Part A directly on an official-layout state dict
(``base_model.*`` CLIP + adapters, ``prompt_learner.*``): per-row caption rewrite, prompt sets built
from ctx/vision and the coupling linears, in-place token replacement per layer, hand-written
multi-head attention. It shares no code with upperson.
"""

from __future__ import annotations

import math

import torch

PLACEHOLDER = 343
SOT, EOT = 49406, 49407


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight + bias


def linear(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ sd[name + ".weight"].t() + sd[name + ".bias"]


def attention(sd: dict, pre: str, x: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    batch, tokens, width = x.shape
    head_dim = width // heads
    qkv = x @ sd[pre + "attn.in_proj_weight"].t() + sd[pre + "attn.in_proj_bias"]
    q, k, v = (t.reshape(batch, tokens, heads, head_dim).transpose(1, 2) for t in qkv.split(width, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    if causal:
        scores = scores + torch.full((tokens, tokens), float("-inf"), dtype=x.dtype).triu(1)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, width)
    return linear(sd, pre + "attn.out_proj", out)


def block(sd: dict, pre: str, x: torch.Tensor, heads: int, causal: bool, adapter_scale: float) -> torch.Tensor:
    x = x + attention(sd, pre, layer_norm(x, sd[pre + "ln_1.weight"], sd[pre + "ln_1.bias"]), heads, causal)
    hidden = linear(sd, pre + "mlp.c_fc", layer_norm(x, sd[pre + "ln_2.weight"], sd[pre + "ln_2.bias"]))
    out = x + linear(sd, pre + "mlp.c_proj", hidden * torch.sigmoid(1.702 * hidden))
    if pre + "adapter_mlp.down.weight" in sd:
        z = layer_norm(x, sd[pre + "ln_3.weight"], sd[pre + "ln_3.bias"])
        out = out + adapter_scale * linear(sd, pre + "adapter_mlp.up", torch.relu(linear(sd, pre + "adapter_mlp.down", z)))
    return out


def prompt_sets(sd: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Spec A.3: text ``[ctx_i ; v2t_i(vision_i)]``, vision ``[t2v_i(ctx_i) ; vision_i]``."""
    text = [sd["prompt_learner.ctx"]]
    vision = [sd["prompt_learner.vision"]]
    t2v = ["prompt_learner.tmap"]
    v2t = ["prompt_learner.vmap"]
    k = 0
    while f"prompt_learner.compound_prompts_text.{k}" in sd:
        text.append(sd[f"prompt_learner.compound_prompts_text.{k}"])
        vision.append(sd[f"prompt_learner.compound_prompts_vision.{k}"])
        t2v.append(f"prompt_learner.compound_prompt_projections.{k}")
        v2t.append(f"prompt_learner.compound_prompt_projections_vision.{k}")
        k += 1
    text_sets = [torch.cat([t, linear(sd, m, v)], 0) for t, v, m in zip(text, vision, v2t)]
    vision_sets = [torch.cat([linear(sd, m, t), v], 0) for t, v, m in zip(text, vision, t2v)]
    return text_sets, vision_sets


def rewrite_captions(ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Spec A.4, row by row with plain Python lists."""
    context = ids.shape[1]
    rows = []
    for row in ids.tolist():
        eot = row.index(EOT)
        if eot < context - prompt_len:
            new = [row[0]] + [PLACEHOLDER] * prompt_len + row[1 : context - prompt_len]
        else:
            new = [row[0]] + [PLACEHOLDER] * prompt_len + row[1 : context - prompt_len - 1] + [EOT]
        rows.append(new)
    return torch.tensor(rows)


def _layers(sd: dict, tower: str) -> int:
    stem = f"base_model.{tower}transformer.resblocks."
    return len({key[len(stem) :].split(".")[0] for key in sd if key.startswith(stem)})


def encode_text(sd: dict, ids: torch.Tensor, heads: int) -> torch.Tensor:
    text_sets, _ = prompt_sets(sd)
    n = text_sets[0].shape[0]
    ids = rewrite_captions(ids, n)
    x = sd["base_model.token_embedding.weight"][ids].clone()
    x[:, 1 : 1 + n] = text_sets[0]
    x = x + sd["base_model.positional_embedding"]
    for layer in range(_layers(sd, "")):
        if 1 <= layer < len(text_sets):
            x = torch.cat([x[:, :1], text_sets[layer].expand(x.shape[0], -1, -1), x[:, 1 + n :]], 1)
        x = block(sd, f"base_model.transformer.resblocks.{layer}.", x, heads, causal=True, adapter_scale=4.0)
    x = layer_norm(x, sd["base_model.ln_final.weight"], sd["base_model.ln_final.bias"])
    return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ sd["base_model.text_projection"]


def encode_image(sd: dict, images: torch.Tensor, heads: int) -> torch.Tensor:
    _, vision_sets = prompt_sets(sd)
    n = vision_sets[0].shape[0]
    weight = sd["base_model.visual.conv1.weight"]
    patch = weight.shape[-1]
    grid = torch.nn.functional.unfold(images, kernel_size=patch, stride=patch)  # [B, 3*p*p, tokens]
    x = grid.transpose(1, 2) @ weight.reshape(weight.shape[0], -1).t()
    cls = sd["base_model.visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd["base_model.visual.positional_embedding"]
    x = torch.cat([x, vision_sets[0].expand(x.shape[0], -1, -1)], 1)
    x = layer_norm(x, sd["base_model.visual.ln_pre.weight"], sd["base_model.visual.ln_pre.bias"])
    for layer in range(_layers(sd, "visual.")):
        if 1 <= layer < len(vision_sets):
            x = torch.cat([x[:, : x.shape[1] - n], vision_sets[layer].expand(x.shape[0], -1, -1)], 1)
        x = block(sd, f"base_model.visual.transformer.resblocks.{layer}.", x, heads, causal=False, adapter_scale=0.1)
    cls = layer_norm(x[:, 0], sd["base_model.visual.ln_post.weight"], sd["base_model.visual.ln_post.bias"])
    return cls @ sd["base_model.visual.proj"]
