"""The model users hold: a frozen open_clip CLIP with one method's PETL modules injected."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from upperson.backbone.loading import Backbone, BackboneSpec, state_dict_sha256
from upperson.losses import at_least_fp32
from upperson.methods.exact_shortcuts import clip_image_features, clip_text_features, image_embeddings
from upperson.petl import PETLAttention, PETLModule

if TYPE_CHECKING:
    from upperson.methods.registry import MethodEntry


@dataclass
class ParameterReport:
    """Trainable/total parameter counts with a per-encoder, per-component breakdown."""

    trainable: int
    total: int
    breakdown: dict[str, dict[str, int]] = field(default_factory=dict)
    """``{"vision": {"prefix": n, ...}, "text": {...}}``."""

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total


class RetrievalModel(nn.Module):
    """CLIP encoders with PETL modules; features are the projected, unnormalised CLS/EOT tokens.

    Only parameters of :class:`~upperson.petl.PETLModule` instances train; the backbone is frozen
    structurally when the model is built.
    """

    def __init__(self, backbone: Backbone, entry: MethodEntry, config: Any) -> None:
        super().__init__()
        self.entry = entry  # everything method-specific is asked of the registry entry
        self.trains_backbone = entry.trains_backbone
        self._image_encoder = entry.encode_image
        self._text_encoder = entry.encode_text
        self.clip = backbone.clip
        self.method = entry.name
        self.config = config
        self.backbone_spec: BackboneSpec = backbone.spec
        self.backbone_source = backbone.source
        self.backbone_sha256 = backbone.weights_sha256
        self.freeze_backbone()

    def freeze_backbone(self) -> None:
        """Freeze everything, then unfreeze exactly the PETL modules' parameters.

        Full fine-tuning unfreezes every CLIP weight instead, except the unused ``logit_scale``.
        """
        self.requires_grad_(False)
        for module in self.petl_modules():
            module.requires_grad_(True)
        if self.trains_backbone:
            for name, parameter in self.clip.named_parameters():
                parameter.requires_grad_(name != "logit_scale")

    def petl_modules(self) -> Iterator[PETLModule]:
        """Outermost PETL modules (nested PETL parts are reached through their parent)."""
        return _outermost_petl_modules(self)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` normalised images → ``[N, embed_dim]`` CLS features (fp32, or fp64 for an fp64 model) (unnormalised)."""
        if self._image_encoder is not None:
            return at_least_fp32(self._image_encoder(self.clip, images))
        return at_least_fp32(clip_image_features(self.clip, images))

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``[N, context_length]`` token ids → ``[N, embed_dim]`` EOT features (fp32 or fp64) (unnormalised)."""
        if self._text_encoder is not None:
            return at_least_fp32(self._text_encoder(self.clip, token_ids))
        return at_least_fp32(clip_text_features(self.clip, token_ids))

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` images → ``[N, 1 + patches, embed_dim]`` projected tokens, CLS first.

        Every token goes through ``ln_post @ proj`` as the CLS token does in `encode_image`, so row 0
        is the image feature; IRRA's MLM cross-attends to all rows.
        """
        visual = self.clip.visual
        self._require_plain_tokens("image", self._image_encoder)
        if visual.attn_pool is not None or visual.final_ln_after_pool or visual.pool_type != "tok" or visual.proj is None:
            raise ValueError("encode_image_tokens needs a ViT that pools its CLS token after ln_post and projects it")
        x = visual.ln_post(visual.transformer(image_embeddings(visual, images)))
        return at_least_fp32(x @ visual.proj)

    def encode_text_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``[N, context_length]`` ids → ``[N, context_length, embed_dim]`` projected tokens.

        Every token goes through ``ln_final @ text_projection`` as the EOT token does in
        `encode_text`, so the row at ``argmax(ids)`` is the text feature.
        """
        clip = self.clip
        self._require_plain_tokens("text", self._text_encoder)
        if getattr(clip, "text_pool_type", "argmax") != "argmax":
            raise ValueError("encode_text_tokens needs a CLIP text tower pooled at the EOT (argmax) token")
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(token_ids).to(cast_dtype) + clip.positional_embedding.to(cast_dtype)  # [N, L, width]
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
        x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
        return at_least_fp32(x)

    def _require_plain_tokens(self, tower: str, encoder: Callable[..., torch.Tensor] | None) -> None:
        if encoder is not None:
            raise ValueError(
                f"method {self.method!r} encodes {tower} with its own token flow; token-level features (and so the "
                "MLM loss, train.losses 'mlm') are not supported for it"
            )

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(token_ids)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor that defines the adapter: PETL parameters and buffers, by model key."""
        petl_ids = {id(tensor) for module in self.petl_modules() for tensor in module.state_dict(keep_vars=True).values()}
        if self.trains_backbone:
            petl_ids |= {id(p) for name, p in self.clip.named_parameters() if name != "logit_scale"}
        return {
            name: tensor
            for name, tensor in self.state_dict(keep_vars=True).items()
            if id(tensor) in petl_ids
        }

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen CLIP tensors, by their open_clip key."""
        petl_ids = {id(tensor) for tensor in self.trainable_state_dict().values()}
        return {name: tensor for name, tensor in self.clip.state_dict(keep_vars=True).items() if id(tensor) not in petl_ids}

    def refresh_backbone_fingerprint(self) -> None:
        """Recompute the backbone SHA-256 after its weights were replaced (e.g. by an official import)."""
        self.backbone_sha256 = state_dict_sha256(self.backbone_state_dict())

    def store_frozen_matmul_weights(self, dtype: torch.dtype) -> int:
        """Keep frozen Linear/Conv2d weights in ``dtype`` (bf16/fp16) for autocast training.

        Autocast casts these weights (and biases) to its dtype at every use, so storing them that way
        changes no output bit; it removes the per-step casts of the whole backbone and halves its
        memory. LayerNorms, embeddings, projections stored as parameters, the attention
        in-projection (LoRA adds its fp32 update to it) and everything inside PETL modules stay as
        they are. The model then needs autocast (or ``dtype`` inputs) to run. Returns how many
        modules were converted.
        """
        keep = {id(module) for outer in self.petl_modules() for module in outer.modules()}
        # open_clip takes the text stream's dtype from the first block's c_fc weight
        # (Transformer.get_cast_dtype): that one weight stays as it is, so the stream stays fp32.
        keep |= {id(tower.resblocks[0].mlp.c_fc) for tower in (self.clip.transformer, self.clip.visual.transformer)}
        converted = 0
        for module in self.clip.modules():
            if id(module) in keep or not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            if any(parameter.requires_grad for parameter in module.parameters(recurse=False)):
                continue
            module.to(dtype)
            converted += 1
        return converted

    def merge_lora(self) -> None:
        """Fold LoRA into the frozen in-projections for inference."""
        for module in self.modules():
            if isinstance(module, PETLAttention):
                module.merge_lora()

    def unmerge_lora(self) -> None:
        """Undo :meth:`merge_lora`."""
        for module in self.modules():
            if isinstance(module, PETLAttention):
                module.unmerge_lora()

    @property
    def lora_merged(self) -> bool:
        return any(isinstance(m, PETLAttention) and m.lora_merged for m in self.modules())

    def parameter_report(self) -> ParameterReport:
        """Counts as the papers report them: CLIP's unused ``logit_scale`` (τ is fixed) is excluded."""
        breakdown: dict[str, dict[str, int]] = {}
        vision_modules = {id(module) for module in self.clip.visual.modules()}
        for encoder in ("vision", "text"):
            breakdown[encoder] = dict.fromkeys(self.entry.parameter_columns, 0)
        for module in _outermost_petl_modules(self.clip):  # text = everything of CLIP outside the vision tower
            counts = breakdown["vision" if id(module) in vision_modules else "text"]
            counts[module.component] = counts.get(module.component, 0) + sum(p.numel() for p in module.parameters() if p.requires_grad)
        if self.trains_backbone:
            vision = sum(p.numel() for p in self.clip.visual.parameters() if p.requires_grad)
            text = sum(p.numel() for name, p in self.clip.named_parameters() if p.requires_grad and not name.startswith("visual."))
            breakdown["vision"]["backbone"], breakdown["text"]["backbone"] = vision, text
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(
            p.numel() for name, p in self.clip.named_parameters() if not p.requires_grad and name != "logit_scale"
        )
        return ParameterReport(trainable=trainable, total=trainable + frozen, breakdown=breakdown)


def _outermost_petl_modules(root: nn.Module) -> Iterator[PETLModule]:
    seen: set[int] = set()
    for module in root.modules():
        if isinstance(module, PETLModule) and id(module) not in seen:
            seen.update(id(child) for child in module.modules())
            yield module
