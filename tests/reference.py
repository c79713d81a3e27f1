"""An independent, formula-level implementation of the official UP-Person forward pass.

Written from ``shared/spec/up-person.md`` directly on an official-layout state dict: the prefix is
inserted at key position 1 as the official code does, λ scales the post-softmax prefix columns, LoRA
is added to the dense in-projection, adapters read the raw stream. It shares no code with upperson.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TOWERS = {"visual.": ("image", "vit"), "": ("text", "text")}


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight + bias


def _adapter(sd: dict, prefix: str, which: str, z: torch.Tensor) -> torch.Tensor:
    key = f"{prefix}adapter_ln_{which}."
    if key + "down.weight" not in sd:
        return torch.zeros_like(z)
    hidden = torch.relu(z @ sd[key + "down.weight"].t() + sd[key + "down.bias"])
    return hidden @ sd[key + "up.weight"].t() + sd[key + "up.bias"]


def block(sd: dict, tower: str, layer: int, x: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    pre = f"base_model.{tower}transformer.resblocks.{layer}."
    lora_name, prefix_name = TOWERS[tower]
    batch, tokens, width = x.shape
    head_dim = width // heads
    scale_1 = sd.get(pre + "scale_1", torch.tensor(0.0))
    scale_2 = sd.get(pre + "scale_2", torch.tensor(0.0))
    h = layer_norm(x, sd[pre + "ln_1.weight"], sd[pre + "ln_1.bias"]) + scale_1 * _adapter(sd, pre, "msa", x)

    weight = sd[pre + "attn.in_proj_weight"]
    lora = f"LORA_learner.lora_{lora_name}.{layer}."
    if lora + "lora_A.0" in sd:
        delta_k = sd[lora + "scale.0.scale"] * sd[lora + "lora_B.0"] @ sd[lora + "lora_A.0"]
        delta_v = sd[lora + "scale.1.scale"] * sd[lora + "lora_B.1"] @ sd[lora + "lora_A.1"]
        weight = weight + torch.cat([torch.zeros_like(delta_k), delta_k, delta_v], 0)
    qkv = h @ weight.t() + sd[pre + "attn.in_proj_bias"]
    q, k, v = qkv[..., :width], qkv[..., width : 2 * width], qkv[..., 2 * width :]

    prefix = f"{prefix_name}_prefix_learner.{prefix_name}_prefix.{layer}."
    prefix_length = 0
    if prefix + "key.tokens" in sd:
        prefix_keys = sd[prefix + "key.scaler.scale"] * sd[prefix + "key.tokens"]
        prefix_values = sd[prefix + "val.scaler.scale"] * sd[prefix + "val.tokens"]
        prefix_length = prefix_keys.shape[0]
        k = torch.cat([k[:, :1], prefix_keys.expand(batch, -1, -1), k[:, 1:]], 1)
        v = torch.cat([v[:, :1], prefix_values.expand(batch, -1, -1), v[:, 1:]], 1)

    mask = torch.zeros(tokens, tokens + prefix_length)
    if causal:
        causal_mask = torch.full((tokens, tokens), float("-inf")).triu(1)
        mask = torch.cat([causal_mask[:, :1], torch.zeros(tokens, prefix_length), causal_mask[:, 1:]], 1)

    outputs = []
    for head in range(heads):
        cols = slice(head * head_dim, (head + 1) * head_dim)
        scores = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(head_dim) + mask
        attention = scores.softmax(-1)
        if prefix_length:
            attention = torch.cat(
                [
                    attention[..., :1],
                    attention[..., 1 : 1 + prefix_length] * sd[prefix + "scale_to_grad"],
                    attention[..., 1 + prefix_length :],
                ],
                -1,
            )
        outputs.append(attention @ v[..., cols])
    attended = torch.cat(outputs, -1)
    x = x + attended @ sd[pre + "attn.out_proj.weight"].t() + sd[pre + "attn.out_proj.bias"]

    h2 = layer_norm(x, sd[pre + "ln_2.weight"], sd[pre + "ln_2.bias"]) + scale_2 * _adapter(sd, pre, "mlp", x)
    hidden = h2 @ sd[pre + "mlp.c_fc.weight"].t() + sd[pre + "mlp.c_fc.bias"]
    hidden = hidden * torch.sigmoid(1.702 * hidden)
    return x + hidden @ sd[pre + "mlp.c_proj.weight"].t() + sd[pre + "mlp.c_proj.bias"]


def _layers(sd: dict, tower: str) -> int:
    stem = f"base_model.{tower}transformer.resblocks."
    return len({key[len(stem) :].split(".")[0] for key in sd if key.startswith(stem)})


def encode_image(sd: dict, images: torch.Tensor, heads: int) -> torch.Tensor:
    conv = sd["base_model.visual.conv1.weight"]
    patch = conv.shape[-1]
    grid = F.conv2d(images, conv, stride=patch)  # [B, width, rows, cols]
    tokens = grid.flatten(2).transpose(1, 2)  # row-major: token = row * cols + col
    cls = sd["base_model.visual.class_embedding"].expand(images.shape[0], 1, -1)
    x = torch.cat([cls, tokens], 1) + sd["base_model.visual.positional_embedding"]
    x = layer_norm(x, sd["base_model.visual.ln_pre.weight"], sd["base_model.visual.ln_pre.bias"])
    for layer in range(_layers(sd, "visual.")):
        x = block(sd, "visual.", layer, x, heads, causal=False)
    x = layer_norm(x, sd["base_model.visual.ln_post.weight"], sd["base_model.visual.ln_post.bias"])
    return (x @ sd["base_model.visual.proj"])[:, 0]


def encode_text(sd: dict, ids: torch.Tensor, heads: int) -> torch.Tensor:
    x = sd["base_model.token_embedding.weight"][ids] + sd["base_model.positional_embedding"]
    for layer in range(_layers(sd, "")):
        x = block(sd, "", layer, x, heads, causal=True)
    x = layer_norm(x, sd["base_model.ln_final.weight"], sd["base_model.ln_final.bias"])
    x = x @ sd["base_model.text_projection"]
    return x[torch.arange(ids.shape[0]), ids.argmax(-1)]


def sdm(image: torch.Tensor, text: torch.Tensor, pids: torch.Tensor, temperature: float = 0.02) -> torch.Tensor:
    """Loop-free but independent SDM: KL of softmax(similarity/τ) to the normalised pid-match labels."""
    image = image / image.norm(dim=1, keepdim=True)
    text = text / text.norm(dim=1, keepdim=True)
    labels = (pids[:, None] == pids[None, :]).to(image.dtype)
    labels = labels / labels.sum(1, keepdim=True)
    total = 0.0
    for logits in (image @ text.t() / temperature, text @ image.t() / temperature):
        p = torch.exp(logits - torch.logsumexp(logits, 1, keepdim=True))
        total = total + (p * (torch.log(p) - torch.log(labels + 1e-8))).sum(1).mean()
    return total
