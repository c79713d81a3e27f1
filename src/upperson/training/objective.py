"""The training objective: the selected losses plus the parts they train besides the model.

IRRA's ID loss needs an identity classifier and its MLM loss a cross-modal head. They live here,
not in the `RetrievalModel`, because they only exist for training: adapter files stay
retrieval-only, while the trainer optimises these heads with the model and keeps them in the
resumable state.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
from open_clip.transformer import LayerNorm, QuickGELU, Transformer
from torch import nn

from upperson.losses import LOSS_NAMES, at_least_fp32, id_loss, itc_loss, mlm_loss, sdm_loss
from upperson.training.distributed import gather_global_batch

CLASSIFIER_INIT_STD = 0.001
"""IRRA initialises the classifier weight with N(0, 0.001²) and the bias with 0 (spec B.8)."""
MLM_DEPTH = 4
"""IRRA's ``--cmt_depth``: blocks of the cross-modal transformer after the cross-attention."""
MLM_HEAD_WIDTH = 64
"""Width of one attention head in the MLM head (IRRA: ``embed_dim // 64`` heads)."""
CONTRASTIVE_LOSSES = frozenset({"sdm", "itc"})
"""Losses whose negatives are the other samples of the batch: the ones ``sdm_scope="global"`` gathers for."""


class MLMHead(nn.Module):
    """IRRA's masked-language-modelling head: masked-caption tokens attend to image tokens.

    Cross-attention (queries ``ln_pre_t(text)``, keys/values ``ln_pre_i(image)``), a
    ``depth``-block transformer, ``ln_post``, then ``mlm_head`` (Linear → QuickGELU → LayerNorm →
    Linear to the vocabulary). Attribute names follow IRRA so that its lr rules ("cross",
    "mlm_head") and checkpoints read the same.

    Args:
        embed_dim: size of the projected token features of both encoders.
        vocab_size: number of token ids the head predicts (the CLIP vocabulary).
        depth: blocks of the cross-modal transformer.
    """

    def __init__(self, embed_dim: int, vocab_size: int, depth: int = MLM_DEPTH) -> None:
        super().__init__()
        heads = max(1, embed_dim // MLM_HEAD_WIDTH)
        self.cross_attn = nn.MultiheadAttention(embed_dim, heads, batch_first=True)
        self.cross_modal_transformer = Transformer(width=embed_dim, layers=depth, heads=heads, act_layer=QuickGELU)
        self.ln_pre_t = LayerNorm(embed_dim)
        self.ln_pre_i = LayerNorm(embed_dim)
        self.ln_post = LayerNorm(embed_dim)
        self.mlm_head = nn.Sequential(
            OrderedDict(
                dense=nn.Linear(embed_dim, embed_dim),
                gelu=QuickGELU(),
                ln=LayerNorm(embed_dim),
                fc=nn.Linear(embed_dim, vocab_size),
            )
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """IRRA's init: GPT-2-style stds from the width and depth; biases and LayerNorms keep torch's defaults."""
        width, layers = self.cross_modal_transformer.width, self.cross_modal_transformer.layers
        attn_std = width**-0.5
        proj_std = attn_std * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.cross_modal_transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.cross_attn.in_proj_weight, std=attn_std)
        nn.init.normal_(self.cross_attn.out_proj.weight, std=proj_std)
        nn.init.normal_(self.mlm_head.dense.weight, std=fc_std)
        nn.init.normal_(self.mlm_head.fc.weight, std=proj_std)

    def forward(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` masked-caption tokens, ``[B, T, D]`` image tokens → ``[B, L, vocab]`` logits."""
        image = self.ln_pre_i(image_tokens)
        x = self.cross_attn(self.ln_pre_t(text_tokens), image, image, need_weights=False)[0]  # [B, L, D]
        x = self.ln_post(self.cross_modal_transformer(x))
        return self.mlm_head(x)


class TrainingObjective(nn.Module):
    """Sum of the configured losses over unnormalised image and text features.

    Args:
        losses: names from :data:`upperson.losses.LOSS_NAMES`, e.g. ``("sdm", "id")``.
        embed_dim: feature size of the encoders (input of the identity classifier and MLM head).
        num_classes: number of training identities (output of the identity classifier).
        temperature: τ of the SDM and ITC logits.
        vocab_size: token vocabulary the MLM head predicts; required when ``"mlm"`` is selected.
        sdm_scope: ``"global"`` computes SDM and ITC on the batch of all processes (features all-gathered
            with their gradients, and pids: :func:`~upperson.training.distributed.gather_global_batch`),
            ``"local"`` on this process's batch; ID and MLM always use the local batch. Without a
            process group of several processes both are the same.
    """

    def __init__(
        self,
        losses: Sequence[str],
        embed_dim: int,
        num_classes: int,
        temperature: float,
        vocab_size: int | None = None,
        sdm_scope: Literal["local", "global"] = "local",
    ) -> None:
        super().__init__()
        unknown = [name for name in losses if name not in LOSS_NAMES]
        if unknown or not losses:
            raise ValueError(f"losses must be a non-empty selection of {LOSS_NAMES}, got {list(losses)}")
        if sdm_scope not in ("local", "global"):
            raise ValueError(f"sdm_scope must be 'local' or 'global', got {sdm_scope!r}")
        if "mlm" in losses and vocab_size is None:
            raise ValueError("the mlm loss needs the vocabulary size of the text encoder (vocab_size)")
        self.losses = tuple(losses)
        self.temperature = temperature
        self.sdm_scope = sdm_scope
        self.classifier = nn.Linear(embed_dim, num_classes) if "id" in self.losses else None
        self.mlm = MLMHead(embed_dim, vocab_size) if "mlm" in self.losses else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=CLASSIFIER_INIT_STD)
            nn.init.zeros_(self.classifier.bias)
        if self.mlm is not None:
            self.mlm.reset_parameters()

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        pids: torch.Tensor,
        mlm_logits: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Each selected loss by name (``[B, D]`` features, ``[B]`` pids); the training loss is their sum.

        ``mlm_logits`` (``[B, L, vocab]``, from :attr:`mlm` run under the encoders' autocast) and
        ``mlm_labels`` (``[B, L]``) are needed exactly when ``"mlm"`` is selected.
        """
        terms: dict[str, torch.Tensor] = {}
        contrastive = (image_features, text_features, pids)
        if self.sdm_scope == "global" and CONTRASTIVE_LOSSES & set(self.losses):
            contrastive = gather_global_batch(image_features, text_features, pids)  # [B_global, D] x 2, [B_global]
        for name in self.losses:
            if name == "sdm":
                terms[name] = sdm_loss(*contrastive, temperature=self.temperature)
            elif name == "itc":
                terms[name] = itc_loss(*contrastive[:2], temperature=self.temperature)
            elif name == "id":
                weight = self.classifier.weight
                image_logits = self.classifier(at_least_fp32(image_features).to(weight.dtype))  # [B, num_classes]
                text_logits = self.classifier(at_least_fp32(text_features).to(weight.dtype))
                terms[name] = id_loss(image_logits, text_logits, pids)
            else:
                if mlm_logits is None or mlm_labels is None:
                    raise ValueError("the mlm loss needs mlm_logits and mlm_labels (train with a dataset built with mlm=True)")
                terms[name] = mlm_loss(mlm_logits, mlm_labels)
        return terms

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())
