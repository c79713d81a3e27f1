"""Training a method on a dataset: validate data, train with the selected losses, select, checkpoint, resume, report."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import upperson
from upperson.config import RunConfig, load_config, save_config
from upperson.data import check_dataset, load_dataset
from upperson.data.datasets import ImageTextDataset, collate_skip_none
from upperson.data.records import RetrievalDataset
from upperson.data.samplers import build_train_batches
from upperson.data.transforms import build_transforms
from upperson.evaluation.evaluate import evaluate_with_config
from upperson.methods import RetrievalModel
from upperson.runtime import Progress, SilentProgress, epoch_seed, resolve_device, resolve_precision, seed_everything
from upperson.training.checkpoint import (
    BEST_ADAPTER,
    LAST_ADAPTER,
    STATE_FILE,
    TrainingState,
    load_training_state,
    read_trained_config,
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
from upperson.training.history import CONFIG_FILE, append_history, log_to_file, write_metrics
from upperson.training.run_dir import (
    RunDirectoryError,
    check_new_run,
    prepare_new_run,
    rebuild_history,
    remove_stale_temporaries,
    resume_changes,
    run_lock,
)
from upperson.training.schedule import sync_lr_with_schedule
from upperson.training.step import TrainingParts, backward, build_training, loss_terms, optimizer_step

logger = logging.getLogger(__name__)

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


def default_run_dir(config: RunConfig) -> Path:
    """``output_dir/run_name``, or a name from the dataset, method and start time."""
    name = config.run_name or f"{config.data.dataset}-{config.method}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(config.output_dir) / name


class Trainer:
    """Runs one configured training job in ``run_dir``.

    Every epoch writes ``last.safetensors`` and ``state.pt`` (atomic); the best adapter on the
    selection split goes to ``best.safetensors``. ``fit(resume=True)`` continues after the last
    completed epoch and ends with the same adapter as an uninterrupted run: data order, masking and
    augmentation are seeded from ``(seed, epoch)``.

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process trains on its share of the data with
    DistributedDataParallel: ``train.batch_size`` stays the global batch; every rank draws the same
    global order and takes its slice of each micro-batch (`GlobalBatchSlices`), and augmentation and
    masking are keyed on ``(seed, epoch, sample)``, so the global batch of every step is the one a
    single process trains on. Losses are computed per rank on the local batch (SDM and ITC on all
    ranks' batches with ``train.sdm_scope: global``). Only
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
        self.progress = (progress or SilentProgress) if self.is_main else SilentProgress
        world = self.distributed.world_size
        if self.distributed.enabled:
            self.device = resolve_distributed_device(config.device, self.distributed)
        else:
            self.device = resolve_device(config.device)
        resolve_precision(config.train.precision, self.device)  # fails fast on fp16 without CUDA
        if config.train.batch_size % (world * config.train.grad_accumulation):
            raise ValueError(
                f"train.batch_size ({config.train.batch_size}) is the global batch: it must be divisible by the "
                f"number of processes ({world}) x train.grad_accumulation ({config.train.grad_accumulation})"
            )

    def fit(self, resume: bool = False, stop_after_epochs: int | None = None, overwrite: bool = False) -> TrainResult | None:
        """Train; returns ``None`` when stopped early by ``stop_after_epochs`` (resume later).

        Args:
            resume: continue the run in ``run_dir`` after its last completed epoch (from epoch 0 when
                none completed); only :data:`~upperson.training.run_dir.RESUMABLE_FIELDS` may differ
                from the config its ``state.pt`` was trained with (else from its ``config.yaml``),
                which is updated.
            stop_after_epochs: stop (resumably) once this many epochs are complete.
            overwrite: start a new run even if ``run_dir`` holds one; the old run is moved aside.

        Under torchrun every rank returns rank 0's result.

        The run directory is checked first (an existing run without ``overwrite``, what a resume
        changes), then the dataset; only then is anything written, so a failed check leaves the
        directory as it was, and retrying in it once the data is fixed starts the run.
        """
        with process_group(self.distributed, self.device):
            if self.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            with run_lock(self.run_dir) if self.is_main else nullcontext():
                changed = self._check_run_dir(resume, overwrite) if self.is_main else False
                seed_everything(self.config.train.seed)
                dataset = self._load_validated_dataset()
                if self.is_main:
                    self._record_run(resume, overwrite, changed)
                barrier(self.distributed, self.device)
                return self._fit(dataset, resume, stop_after_epochs)

    def _check_run_dir(self, resume: bool, overwrite: bool) -> bool:
        """Refuse another run in the directory (unless ``overwrite``) or a resume that changes what the run trains,
        before anything is built or written; returns whether a resume changes the config."""
        if not resume:
            check_new_run(self.run_dir, overwrite)
            return False
        saved_path = self.run_dir / CONFIG_FILE
        if not saved_path.is_file():
            raise RunDirectoryError(f"--resume {self.run_dir}: no {CONFIG_FILE} there, so it holds no run to continue")
        state_path = self.run_dir / STATE_FILE
        trained = read_trained_config(state_path) if state_path.is_file() else None
        if trained is not None:
            return bool(resume_changes(trained, self.config, self.run_dir, STATE_FILE))
        if state_path.is_file():
            logger.warning(
                "%s records no config (written by an older upperson): --resume compares with %s, so edits of that file go unnoticed",
                state_path, CONFIG_FILE,
            )
        return bool(resume_changes(load_config(saved_path).to_dict(), self.config, self.run_dir, CONFIG_FILE))

    def _record_run(self, resume: bool, overwrite: bool, changed: bool) -> None:
        """Move an old run aside (``overwrite``) and write the config of a new run, or of a resume that changed it."""
        if not resume:
            prepare_new_run(self.run_dir, overwrite)
        if not resume or changed:
            save_config(self.config, self.run_dir / CONFIG_FILE)

    def _fit(self, dataset: RetrievalDataset, resume: bool, stop_after_epochs: int | None) -> TrainResult | None:
        config = self.config
        with log_to_file(self.run_dir) if self.is_main else nullcontext():
            if self.is_main:
                remove_stale_temporaries(self.run_dir)
            parts = build_training(config, dataset.num_train_ids, self.device, self.distributed)
            if not parts.model.trainable_state_dict():
                raise ValueError(f"method {config.method!r} has nothing to train; evaluate it with `upperson eval --config ...`")
            counts = parts.parameter_counts()
            logger.info(
                "trainable %s of %s parameters (%.2f %%; loss head %s); losses %s; precision %s (train.precision %s) on %s",
                f"{counts['trainable']:,}", f"{counts['total']:,}", 100 * counts["trainable"] / counts["total"],
                f"{counts['loss_head']:,}", "+".join(config.train.losses), parts.precision, config.train.precision, self.device,
            )
            state = TrainingState(0, None, None)
            if resume and (self.run_dir / STATE_FILE).is_file():
                state = load_training_state(
                    self.run_dir / STATE_FILE, parts.model, parts.optimizer, parts.scheduler, parts.scaler, parts.objective
                )
                sync_lr_with_schedule(parts.scheduler)
                logger.info("resuming after epoch %d", state.completed_epochs)
            elif resume:
                logger.info("no epoch of %s had completed: training from the start", self.run_dir)
            if self.is_main:
                rebuild_history(self.run_dir, state.completed_epochs)
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
                        self.run_dir / STATE_FILE, parts.model, parts.optimizer, parts.scheduler, parts.scaler, state, parts.objective,
                        config=config.to_dict(),
                    )
                barrier(self.distributed, self.device)
                if stop_after_epochs is not None and state.completed_epochs >= stop_after_epochs < config.train.epochs:
                    logger.info("stopping after epoch %d as requested; resume with --resume %s", epoch + 1, self.run_dir)
                    return None
            result = self._final_report(parts.model, dataset, selection, state, counts) if self.is_main else None
            return broadcast_from_main(result, self.distributed)

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

    def _loader_seed(self, epoch: int) -> int:
        """Seed of the loader's worker RNGs in ``epoch``, the same on every rank (items seed their own draws)."""
        return epoch_seed(self.config.train.seed, epoch)

    def _train_loader(self, train_set: ImageTextDataset, epoch: int) -> DataLoader:
        config = self.config
        batches = build_train_batches(
            config.data.sampler,
            [sample.pid for sample in train_set.samples],
            batch_size=config.train.batch_size,
            micro_batch=config.train.batch_size // config.train.grad_accumulation,
            seed=config.train.seed,
            num_replicas=self.distributed.world_size,
            rank=self.distributed.rank,
            num_instances=config.data.num_instances,
            drop_last=config.data.drop_last,
        )
        batches.set_epoch(epoch)  # the global order is seeded from (seed, epoch)
        train_set.set_epoch(epoch)
        return DataLoader(
            train_set,
            batch_sampler=batches,
            num_workers=config.data.num_workers,
            collate_fn=collate_skip_none,
            generator=torch.Generator().manual_seed(self._loader_seed(epoch)),
            pin_memory=self.device.type == "cuda",
        )

    def _train_epoch(self, parts: TrainingParts, train_set: ImageTextDataset, epoch: int) -> None:
        config = self.config
        model, optimizer = parts.model, parts.optimizer
        torch.manual_seed(self._loader_seed(epoch))
        loader = self._train_loader(train_set, epoch)
        accumulation = config.train.grad_accumulation
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        bar = self.progress(total=len(loader), desc=f"epoch {epoch + 1}/{config.train.epochs}", unit="batch")
        started, seen, running_loss, steps = time.perf_counter(), 0, 0.0, 0
        running_terms: dict[str, float] = {}  # the configured losses, then the method's own terms
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
                terms = loss_terms(parts, images, caption_ids, pids, parts.precision, **mlm)
                loss = sum(terms.values())
                backward(parts, loss / accumulation)
            if stepping:
                optimizer_step(parts)
            seen += len(pids)
            steps += 1
            running_loss += loss.item()
            for name, term in terms.items():
                running_terms[name] = running_terms.get(name, 0.0) + term.item()
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
            append_history(self.run_dir, {**row, "lr": lr, "images_per_s": seen / seconds, "seconds": seconds})

    def _select(self, model: RetrievalModel, dataset: RetrievalDataset, selection: str | None, state: TrainingState, epoch: int) -> None:
        config = self.config
        is_last = epoch + 1 == config.train.epochs
        if selection is None or ((epoch + 1) % config.train.eval_every and not is_last):
            return
        metrics = self._evaluate(model, dataset, selection)["t2i"]
        logger.info("epoch %d %s: %s", epoch + 1, selection, _format_metrics(metrics))
        append_history(self.run_dir, {"epoch": epoch + 1, f"{selection}_R1": metrics["R1"], f"{selection}_mAP": metrics["mAP"]})
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
        write_metrics(self.run_dir, {"selection": label, "best_epoch": best_epoch, "parameters": parameters, **test_metrics})
        return TrainResult(self.run_dir, best_path, label, best_epoch, test_metrics, parameters)


def _format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{key} {metrics[key]:.2f}" for key in ("R1", "R5", "R10", "mAP", "mINP"))
