"""One training step: what it touches (model, loss heads, optimizer), the loss terms, the update.

:func:`build_training` is the one place a run's trainable model is built, for the Trainer and for
``upperson profile`` alike, so that what is profiled is what trains.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from upperson.config import RunConfig
from upperson.methods import RetrievalModel, create_model
from upperson.runtime import (
    LOW_PRECISION,
    Precision,
    autocast,
    grad_scaler,
    resolve_compile,
    resolve_precision,
    training_attention,
)
from upperson.training.distributed import DistributedEnv, wrap_ddp
from upperson.training.objective import CONTRASTIVE_LOSSES, TrainingObjective
from upperson.training.schedule import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)


@dataclass
class TrainingParts:
    """Everything one optimizer step touches; built identically for a fresh and a resumed run."""

    model: RetrievalModel
    objective: TrainingObjective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    precision: Precision
    """The precision the steps run in: ``train.precision`` resolved for the device."""
    wrapped: DistributedDataParallel | None = None
    """Under torchrun: model + objective as one DDP module whose forward is :func:`loss_terms`."""

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and total counts including the loss heads, as the paper's Table X counts SDM + ID (+ MLM)."""
        report = self.model.parameter_report()
        head = self.objective.num_parameters()
        return {"trainable": report.trainable + head, "total": report.total + head, "loss_head": head}


class LossStep(nn.Module):
    """The model and the loss heads as one module whose forward returns the loss terms.

    This is what DistributedDataParallel wraps: every encoder call of a step (also the MLM path's
    token encoders, which bypass the model's ``forward``) runs inside DDP's forward, so the
    gradients of the adapters and of the loss heads (ID classifier, MLM head) are averaged over
    the ranks in the same backward pass. Frozen backbone tensors have ``requires_grad=False``
    and are not synchronised.
    """

    def __init__(self, model: RetrievalModel, objective: TrainingObjective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(
        self,
        images: torch.Tensor,
        caption_ids: torch.Tensor,
        pids: torch.Tensor,
        precision: str,
        mlm_ids: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        return _loss_terms(self.model, self.objective, images, caption_ids, pids, precision, mlm_ids, mlm_labels)


def build_training(
    config: RunConfig,
    num_train_ids: int,
    device: torch.device,
    distributed: DistributedEnv | None = None,
) -> TrainingParts:
    """The model, loss head, optimizer, scheduler and grad scaler of a run (call after seeding).

    ``train.precision`` is resolved for ``device``; under bf16/fp16 the frozen matmul weights are
    stored in that dtype (:meth:`RetrievalModel.store_frozen_matmul_weights`: same outputs under
    autocast, faster steps, less memory), so the model must then run under :func:`autocast`.

    With a multi-process ``distributed`` (process group initialised) the model and loss heads are
    also wrapped in DistributedDataParallel (``parts.wrapped``), which :func:`loss_terms` then
    calls; ``parts.model`` stays the unwrapped model, so adapter keys do not change. Only then does
    ``train.sdm_scope`` apply (logged at INFO); without ``distributed`` the objective is local.
    """
    precision = resolve_precision(config.train.precision, device)
    model = create_model(
        config.method, backbone=config.backbone, image_size=config.data.image_size, config=config.method_config()
    ).to(device)
    model.clip.set_grad_checkpointing(config.train.grad_checkpointing)
    if precision in LOW_PRECISION:
        model.store_frozen_matmul_weights(LOW_PRECISION[precision])
    if resolve_compile(config.train.compile, device, precision):
        model.compile()  # the training forward (loss_terms calls the model); evaluation stays eager
    multi_process = distributed is not None and distributed.enabled
    objective = TrainingObjective(
        config.train.losses,
        model.backbone_spec.embed_dim,
        num_train_ids,
        config.train.temperature,
        vocab_size=model.clip.token_embedding.num_embeddings,
        sdm_scope=config.train.sdm_scope if multi_process else "local",
    ).to(device)
    if multi_process:
        _log_sdm_scope(config, distributed.world_size)
    optimizer = build_optimizer(model, config.optim, head=objective, head_lr_factor=config.train.id_lr_factor)
    scheduler = build_scheduler(optimizer, config.optim, config.train.epochs)
    wrapped = None
    if multi_process:
        wrapped = wrap_ddp(LossStep(model, objective), device)
    return TrainingParts(model, objective, optimizer, scheduler, grad_scaler(precision, device), precision, wrapped)


def _log_sdm_scope(config: RunConfig, world_size: int) -> None:
    """Say which batch the contrastive losses of a multi-process run see."""
    train = config.train
    contrastive = [name for name in train.losses if name in CONTRASTIVE_LOSSES]
    if not contrastive:
        logger.info("train.sdm_scope=%s has no effect: train.losses has neither sdm nor itc", train.sdm_scope)
    elif train.sdm_scope == "global":
        logger.info(
            "train.sdm_scope=global: %s over the global batch of %d (features all-gathered from %d processes)",
            "+".join(contrastive), train.batch_size // train.grad_accumulation, world_size,
        )
    else:
        logger.info(
            "train.sdm_scope=local: %s over each process's batch of %d (train.sdm_scope=global: over all %d)",
            "+".join(contrastive), train.batch_size // (world_size * train.grad_accumulation),
            train.batch_size // train.grad_accumulation,
        )


def loss_terms(
    parts: TrainingParts,
    images: torch.Tensor,
    caption_ids: torch.Tensor,
    pids: torch.Tensor,
    precision: str,
    mlm_ids: torch.Tensor | None = None,
    mlm_labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Encode a batch under autocast and evaluate each selected loss (in fp32) on the features.

    With the MLM loss the images are encoded once, to all tokens, and the image feature is their
    CLS row; the masked caption is encoded to all tokens too, and when it is the caption SDM sees
    (caption masking on, as in the official code) its EOT row is the text feature.

    Under DDP (``parts.wrapped``) the losses see this rank's batch only, as in the official DDP
    path, except SDM and ITC with ``train.sdm_scope: global``, which see every rank's batch; the
    backward pass then averages the gradients over the ranks.
    """
    if parts.wrapped is not None:
        return parts.wrapped(images, caption_ids, pids, precision, mlm_ids=mlm_ids, mlm_labels=mlm_labels)
    return _loss_terms(parts.model, parts.objective, images, caption_ids, pids, precision, mlm_ids, mlm_labels)


def _loss_terms(
    model: RetrievalModel,
    objective: TrainingObjective,
    images: torch.Tensor,
    caption_ids: torch.Tensor,
    pids: torch.Tensor,
    precision: str,
    mlm_ids: torch.Tensor | None,
    mlm_labels: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    mlm_head = objective.mlm
    if mlm_head is None:
        with autocast(images.device, precision), training_attention(images.device, precision):
            image_features, text_features = model(images, caption_ids)
        terms = objective(image_features, text_features, pids)
    else:
        if mlm_ids is None or mlm_labels is None:
            raise ValueError("train.losses includes 'mlm': the batch needs mlm_ids and mlm_labels (ImageTextDataset(mlm=True))")
        with autocast(images.device, precision), training_attention(images.device, precision):
            image_tokens = model.encode_image_tokens(images)  # [B, 1 + patches, D]
            text_tokens = model.encode_text_tokens(mlm_ids)  # [B, L, D]
            if torch.equal(mlm_ids, caption_ids):
                text_features = text_tokens[torch.arange(len(caption_ids), device=caption_ids.device), caption_ids.argmax(dim=-1)]
            else:
                text_features = model.encode_text(caption_ids)
            mlm_logits = mlm_head(text_tokens, image_tokens)  # [B, L, vocab]
        image_features = image_tokens[:, 0]
        terms = objective(image_features, text_features, pids, mlm_logits=mlm_logits, mlm_labels=mlm_labels)
    return {**terms, **_method_terms(model, image_features, text_features, pids, set(terms))}


def _method_terms(
    model: RetrievalModel, image_features: torch.Tensor, text_features: torch.Tensor, pids: torch.Tensor, taken: set[str]
) -> dict[str, torch.Tensor]:
    """The loss terms the method's registry entry adds to every step (none for the built-in methods)."""
    extra = model.entry.extra_loss_terms
    if extra is None:
        return {}
    terms = extra(model, image_features, text_features, pids)
    clashing = sorted(taken & set(terms))
    if clashing:
        raise ValueError(f"method {model.method!r} returns extra loss terms named like configured losses: {clashing}")
    return terms


def backward(parts: TrainingParts, loss: torch.Tensor) -> None:
    """Accumulate the gradients of ``loss``, scaled first under fp16 (whose gradients underflow otherwise)."""
    (parts.scaler.scale(loss) if parts.scaler is not None else loss).backward()


def optimizer_step(parts: TrainingParts) -> None:
    """Apply the accumulated gradients (unscaled and skipped on inf/NaN under fp16) and clear them."""
    if parts.scaler is not None:
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    else:
        parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
