"""Training a method on a dataset: validate data, train with the selected losses, select, checkpoint, resume, report."""

from __future__ import annotations

import csv
import json
import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import upperson
from upperson._io import atomic_path
from upperson.config import RunConfig, save_config
from upperson.data import check_dataset, load_dataset
from upperson.data.datasets import ImageTextDataset, collate_skip_none
from upperson.data.records import RetrievalDataset
from upperson.data.samplers import build_train_sampler
from upperson.data.transforms import build_transforms
from upperson.evaluation.evaluate import Progress, _SilentProgress, autocast, evaluate_with_config
from upperson.methods import RetrievalModel, create_model
from upperson.training.checkpoint import (
    BEST_ADAPTER,
    LAST_ADAPTER,
    STATE_FILE,
    TrainingState,
    load_training_state,
    save_training_state,
)
from upperson.training.distributed import (
    DistributedEnv,
    all_reduce_sum,
    barrier,
    broadcast_from_main,
    process_group,
    resolve_distributed_device,
)
from upperson.training.objective import TrainingObjective
from upperson.training.schedule import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
LOG_FILE = "train_log.txt"
TEST_SELECTION_LABEL = "selected on the TEST split (papers' protocol; optimistic)"


class DatasetValidationError(RuntimeError):
    """The dataset would break training; the message is the full data-check report."""


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    best_adapter: Path
    selection: str
    best_epoch: int
    test_metrics: dict[str, dict[str, float]]
    parameters: dict[str, int] = field(default_factory=dict)
    """``trainable``, ``total`` and ``loss_head`` (ID classifier and MLM head) parameter counts."""


@dataclass
class TrainingParts:
    """Everything one optimizer step touches; built identically for a fresh and a resumed run."""

    model: RetrievalModel
    objective: TrainingObjective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
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


LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build_training(
    config: RunConfig,
    num_train_ids: int,
    device: torch.device,
    distributed: DistributedEnv | None = None,
    low_precision_frozen: bool = False,
) -> TrainingParts:
    """The model, loss head, optimizer, scheduler and grad scaler of a run (call after seeding).

    ``low_precision_frozen``: under bf16/fp16 autocast, store the frozen matmul weights in that dtype
    (:meth:`RetrievalModel.store_frozen_matmul_weights`: same outputs, faster steps, less memory);
    the Trainer sets it, callers that run the model outside autocast must not.

    With a multi-process ``distributed`` (process group initialised) the model and loss heads are
    also wrapped in DistributedDataParallel (``parts.wrapped``), which :func:`loss_terms` then
    calls; ``parts.model`` stays the unwrapped model, so adapter keys do not change.
    """
    model = create_model(
        config.method, backbone=config.backbone, image_size=config.data.image_size, config=config.method_config()
    ).to(device)
    model.clip.set_grad_checkpointing(config.train.grad_checkpointing)
    if low_precision_frozen and config.train.precision in LOW_PRECISION:
        model.store_frozen_matmul_weights(LOW_PRECISION[config.train.precision])
    objective = TrainingObjective(
        config.train.losses,
        model.backbone_spec.embed_dim,
        num_train_ids,
        config.train.temperature,
        vocab_size=model.clip.token_embedding.num_embeddings,
    ).to(device)
    optimizer = build_optimizer(model, config.optim, head=objective, head_lr_factor=config.train.id_lr_factor)
    scheduler = build_scheduler(optimizer, config.optim, config.train.epochs)
    scaler = torch.amp.GradScaler("cuda") if config.train.precision == "fp16" else None
    wrapped = None
    if distributed is not None and distributed.enabled:
        wrapped = DistributedDataParallel(LossStep(model, objective), device_ids=[device.index] if device.type == "cuda" else None)
    return TrainingParts(model, objective, optimizer, scheduler, scaler, wrapped)


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
    path; the backward pass then averages the gradients over the ranks.
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
        with autocast(images.device, precision):
            image_features, text_features = model(images, caption_ids)
        return objective(image_features, text_features, pids)
    if mlm_ids is None or mlm_labels is None:
        raise ValueError("train.losses includes 'mlm': the batch needs mlm_ids and mlm_labels (ImageTextDataset(mlm=True))")
    with autocast(images.device, precision):
        image_tokens = model.encode_image_tokens(images)  # [B, 1 + patches, D]
        text_tokens = model.encode_text_tokens(mlm_ids)  # [B, L, D]
        if torch.equal(mlm_ids, caption_ids):
            text_features = text_tokens[torch.arange(len(caption_ids), device=caption_ids.device), caption_ids.argmax(dim=-1)]
        else:
            text_features = model.encode_text(caption_ids)
        mlm_logits = mlm_head(text_tokens, image_tokens)  # [B, L, vocab]
    return objective(image_tokens[:, 0], text_features, pids, mlm_logits=mlm_logits, mlm_labels=mlm_labels)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    """Derive numpy/random seeds from the torch seed the DataLoader gave this worker."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def default_run_dir(config: RunConfig) -> Path:
    name = config.run_name or f"{config.data.dataset}-{config.method}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(config.output_dir) / name


class Trainer:
    """Runs one configured training job in ``run_dir``.

    Every epoch writes ``last.safetensors`` and ``state.pt`` (atomic); the best adapter on the
    selection split goes to ``best.safetensors``. ``fit(resume=True)`` continues after the last
    completed epoch and ends with the same adapter as an uninterrupted run: data order, masking and
    augmentation are seeded from ``(seed, epoch)``.

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process trains on its share of the data with
    DistributedDataParallel: ``train.batch_size`` stays the global batch, each rank gets
    ``batch_size / world_size``, and the losses are computed per rank on the local batch. Rank
    ``r`` seeds augmentation with ``seed + r`` (the weights start identical on every rank). Only
    rank 0 evaluates, writes the run directory and shows progress; the others wait at a barrier.
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        progress: Progress | None = None,
        distributed: DistributedEnv | None = None,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.distributed = distributed or DistributedEnv.from_environment()
        self.is_main = self.distributed.is_main
        self.progress = (progress or _SilentProgress) if self.is_main else _SilentProgress
        world = self.distributed.world_size
        if self.distributed.enabled:
            self.device = resolve_distributed_device(config.device, self.distributed)
        else:
            self.device = resolve_device(config.device)
        if config.train.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("train.precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        if config.train.batch_size % (world * config.train.grad_accumulation):
            raise ValueError(
                f"train.batch_size ({config.train.batch_size}) is the global batch: it must be divisible by the "
                f"number of processes ({world}) x train.grad_accumulation ({config.train.grad_accumulation})"
            )

    def fit(self, resume: bool = False, stop_after_epochs: int | None = None) -> TrainResult | None:
        """Train; returns ``None`` when stopped early by ``stop_after_epochs`` (resume later).

        Under torchrun every rank returns rank 0's result.
        """
        with process_group(self.distributed, self.device):
            return self._fit(resume, stop_after_epochs)

    def _fit(self, resume: bool, stop_after_epochs: int | None) -> TrainResult | None:
        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handler = self._attach_log_file() if self.is_main else None
        try:
            if not resume and self.is_main:
                save_config(config, self.run_dir / CONFIG_FILE)
            seed_everything(config.train.seed)
            dataset = self._load_validated_dataset()
            parts = build_training(config, dataset.num_train_ids, self.device, self.distributed, low_precision_frozen=True)
            if not parts.model.trainable_state_dict():
                raise ValueError(f"method {config.method!r} has nothing to train; evaluate it with `upperson eval --config ...`")
            counts = parts.parameter_counts()
            logger.info(
                "trainable %s of %s parameters (%.2f %%; loss head %s); losses %s",
                f"{counts['trainable']:,}", f"{counts['total']:,}", 100 * counts["trainable"] / counts["total"],
                f"{counts['loss_head']:,}", "+".join(config.train.losses),
            )
            state = TrainingState(0, None, None)
            if resume:
                state = load_training_state(
                    self.run_dir / STATE_FILE, parts.model, parts.optimizer, parts.scheduler, parts.scaler, parts.objective
                )
                logger.info("resuming after epoch %d", state.completed_epochs)
            selection = self._selection_split(dataset)
            train_set = ImageTextDataset(
                dataset.train,
                build_transforms(config.data.image_size, train=True, augment=config.data.augment),
                text_mask_prob=config.data.text_mask_prob,
                seed=config.train.seed,
                mlm="mlm" in config.train.losses,
            )
            for epoch in range(state.completed_epochs, config.train.epochs):
                self._train_epoch(parts, train_set, epoch)
                parts.scheduler.step()
                state.completed_epochs = epoch + 1
                if self.is_main:
                    self._select(parts.model, dataset, selection, state, epoch)
                    upperson.save_adapter(parts.model, self.run_dir / LAST_ADAPTER)
                    save_training_state(
                        self.run_dir / STATE_FILE, parts.model, parts.optimizer, parts.scheduler, parts.scaler, state, parts.objective
                    )
                barrier(self.distributed, self.device)
                if stop_after_epochs is not None and state.completed_epochs >= stop_after_epochs < config.train.epochs:
                    logger.info("stopping after epoch %d as requested; resume with --resume %s", epoch + 1, self.run_dir)
                    return None
            result = self._final_report(parts.model, dataset, selection, state, counts) if self.is_main else None
            return broadcast_from_main(result, self.distributed)
        finally:
            if handler is not None:
                logging.getLogger("upperson").removeHandler(handler)
                handler.close()

    def _attach_log_file(self) -> logging.Handler:
        handler = logging.FileHandler(self.run_dir / LOG_FILE)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        package_logger = logging.getLogger("upperson")
        package_logger.addHandler(handler)
        if package_logger.getEffectiveLevel() > logging.INFO:
            package_logger.setLevel(logging.INFO)
        return handler

    def _load_validated_dataset(self) -> RetrievalDataset:
        data = self.config.data
        report = check_dataset(data.dataset, data.root, verify_images=data.verify_images)
        if not report.ok:
            raise DatasetValidationError(report.format())
        return load_dataset(data.dataset, data.root)

    def _selection_split(self, dataset: RetrievalDataset) -> str | None:
        choice = self.config.train.select_on
        if choice == "last":
            return None
        if choice == "val" and "val" not in dataset.splits:
            logger.info("%s has no val split: the last epoch is kept", dataset.name)
            return None
        if choice == "test":
            logger.warning("model selection on the test split: %s", TEST_SELECTION_LABEL)
        return choice

    def _augmentation_seed(self, epoch: int) -> int:
        """Seed of this rank's augmentation and worker RNGs in ``epoch`` (rank 0 = the single-process seed)."""
        return (self.config.train.seed + self.distributed.rank) * 100_003 + epoch

    def _train_loader(self, train_set: ImageTextDataset, epoch: int) -> DataLoader:
        config = self.config
        rank_batch = config.train.batch_size // self.distributed.world_size
        micro_batch = rank_batch // config.train.grad_accumulation
        sampler = build_train_sampler(
            config.data.sampler,
            [sample.pid for sample in train_set.samples],
            batch_size=rank_batch,
            seed=config.train.seed,
            num_replicas=self.distributed.world_size,
            rank=self.distributed.rank,
            num_instances=config.data.num_instances,
        )
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if hasattr(sampler, "generator") and sampler.generator is not None:
            sampler.generator.manual_seed(config.train.seed * 100_003 + epoch)
        train_set.set_epoch(epoch)
        return DataLoader(
            train_set,
            batch_size=micro_batch,
            sampler=sampler,
            num_workers=config.data.num_workers,
            collate_fn=collate_skip_none,
            drop_last=config.data.drop_last,
            worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(self._augmentation_seed(epoch)),
            pin_memory=self.device.type == "cuda",
        )

    def _train_epoch(self, parts: TrainingParts, train_set: ImageTextDataset, epoch: int) -> None:
        config = self.config
        model, optimizer, scaler = parts.model, parts.optimizer, parts.scaler
        torch.manual_seed(self._augmentation_seed(epoch))  # augmentation in the main process
        loader = self._train_loader(train_set, epoch)
        accumulation = config.train.grad_accumulation
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        bar = self.progress(total=len(loader), desc=f"epoch {epoch + 1}/{config.train.epochs}", unit="batch")
        started, seen, running_loss, steps = time.perf_counter(), 0, 0.0, 0
        running_terms = dict.fromkeys(config.train.losses, 0.0)
        optimizer.zero_grad(set_to_none=True)
        for index, batch in enumerate(loader):
            if batch is None:
                if self.distributed.enabled:
                    raise RuntimeError(f"epoch {epoch + 1} batch {index + 1}: every image was unreadable; under DDP all ranks must take each step")
                continue
            images = batch["images"].to(self.device, non_blocking=True)
            caption_ids = batch["caption_ids"].to(self.device, non_blocking=True)
            pids = batch["pids"].to(self.device, non_blocking=True)
            mlm = {key: batch[key].to(self.device, non_blocking=True) for key in ("mlm_ids", "mlm_labels") if key in batch}
            stepping = (index + 1) % accumulation == 0 or index + 1 == len(loader)
            # gradients are averaged over the ranks only in the backward pass before an optimizer step
            with parts.wrapped.no_sync() if parts.wrapped is not None and not stepping else nullcontext():
                terms = loss_terms(parts, images, caption_ids, pids, config.train.precision, **mlm)
                loss = sum(terms.values())
                (scaler.scale(loss / accumulation) if scaler else loss / accumulation).backward()
            if stepping:
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            seen += len(pids)
            steps += 1
            running_loss += loss.item()
            for name, term in terms.items():
                running_terms[name] += term.item()
            rate = seen / (time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{running_loss / steps:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
            if steps % config.train.log_every == 0:
                logger.info("epoch %d step %d/%d loss %.4f lr %.2e %.1f images/s", epoch + 1, index + 1, len(loader), running_loss / steps, lr, rate)
        bar.close()
        seconds = time.perf_counter() - started
        if self.distributed.enabled:  # the epoch's figures over all ranks: mean losses, total throughput
            world = self.distributed.world_size
            totals = all_reduce_sum([running_loss, *running_terms.values(), float(seen)], self.distributed, self.device)
            running_loss, seen = totals[0] / world, int(totals[-1])
            running_terms = {name: total / world for name, total in zip(running_terms, totals[1:-1])}
        mean_loss = running_loss / max(steps, 1)
        logger.info("epoch %d done: loss %.4f, lr %.2e, %.1f images/s, %.0f s", epoch + 1, mean_loss, lr, seen / seconds, seconds)
        row: dict[str, Any] = {"epoch": epoch + 1, "loss": mean_loss}
        if len(running_terms) > 1:
            row.update({f"loss_{name}": total / max(steps, 1) for name, total in running_terms.items()})
        if self.is_main:
            self._append_history({**row, "lr": lr, "images_per_s": seen / seconds, "seconds": seconds})

    def _select(self, model: RetrievalModel, dataset: RetrievalDataset, selection: str | None, state: TrainingState, epoch: int) -> None:
        config = self.config
        is_last = epoch + 1 == config.train.epochs
        if selection is None or ((epoch + 1) % config.train.eval_every and not is_last):
            return
        metrics = self._evaluate(model, dataset, selection)["t2i"]
        logger.info("epoch %d %s: %s", epoch + 1, selection, _format_metrics(metrics))
        self._append_history({"epoch": epoch + 1, f"{selection}_R1": metrics["R1"], f"{selection}_mAP": metrics["mAP"]})
        if state.best_score is None or metrics["R1"] > state.best_score:
            state.best_score, state.best_epoch = metrics["R1"], epoch + 1
            upperson.save_adapter(model, self.run_dir / BEST_ADAPTER)

    def _evaluate(self, model: RetrievalModel, dataset: RetrievalDataset, split: str, i2t: bool = False) -> dict[str, dict[str, float]]:
        return evaluate_with_config(model, dataset.split(split), self.config, self.device, i2t=i2t, progress=self.progress)

    def _final_report(
        self, model: RetrievalModel, dataset: RetrievalDataset, selection: str | None, state: TrainingState, parameters: dict[str, int]
    ) -> TrainResult:
        best_path = self.run_dir / BEST_ADAPTER
        if selection is None or not best_path.exists():
            upperson.save_adapter(model, best_path)
            label, best_epoch = "last epoch", state.completed_epochs
        else:
            upperson.load_adapter(model, best_path)
            label = f"best R1 on {selection}" if selection == "val" else TEST_SELECTION_LABEL
            best_epoch = state.best_epoch or state.completed_epochs
        test_metrics = self._evaluate(model, dataset, "test", i2t=self.config.eval.i2t)
        logger.info("test (%s, epoch %d): %s", label, best_epoch, _format_metrics(test_metrics["t2i"]))
        with atomic_path(self.run_dir / METRICS_FILE) as temporary:
            report = {"selection": label, "best_epoch": best_epoch, "parameters": parameters, **test_metrics}
            temporary.write_text(json.dumps(report, indent=2))
        return TrainResult(self.run_dir, best_path, label, best_epoch, test_metrics, parameters)

    def _append_history(self, row: dict[str, Any]) -> None:
        path = self.run_dir / HISTORY_FILE
        new_file = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new_file:
                writer.writerow(["epoch", "key", "value"])
            epoch = row.pop("epoch")
            for key, value in row.items():
                writer.writerow([epoch, key, value])


def _format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{key} {metrics[key]:.2f}" for key in ("R1", "R5", "R10", "mAP", "mINP"))
