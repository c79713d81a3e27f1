"""The built-in default: synthetic pedestrians → UP-Person on a tiny CLIP → metrics and a figure.

Runs anywhere with no downloads: the synthetic data is written in the CUHK-PEDES on-disk format,
so the real reader, trainer and evaluator are what run. The frozen backbone is a tiny CLIP
pre-trained (cached) on a separate synthetic corpus by :mod:`upperson.experiments.pretraining`, loaded from its
checkpoint file like any user's CLIP; the demo reports chance, that backbone zero-shot, and UP-Person.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from upperson.config import DataConfig, EvalConfig, OptimConfig, RunConfig, TrainConfig
from upperson.data import load_dataset
from upperson.data.synthetic import generate_synthetic_cuhk
from upperson.evaluation.evaluate import evaluate_split, extract_features
from upperson.experiments.pretraining import pretrained_tiny_clip
from upperson.retrieval.factory import build_inference_model
from upperson.retrieval.gallery import GalleryIndex
from upperson.runtime import Progress
from upperson.training.history import CONFIG_FILE
from upperson.training.loop import Trainer
from upperson.visualize import save_retrieval_figure

DEMO_IMAGE_SIZE = (128, 48)
"""8 x 3 patches of 16 pixels: pedestrian aspect ratio, cheap enough for a 2-core CPU."""
FIGURE_QUERIES = 6
GALLERY_DIR = "gallery"
"""Inside the demo's run directory: a copy of the held-out images. An index may read images only beside
it (inside the folder that holds the index), so the gallery the demo serves lives in the run
directory too, not in the shared dataset cache."""
GALLERY_INDEX_DIR = "gallery-index"
"""Inside the demo's run directory: :data:`GALLERY_DIR` indexed for ``upperson search`` / ``upperson serve``."""
DEMO_EPOCHS = 14


@dataclass
class DemoResult:
    run_dir: Path
    adapter: Path
    figure: Path
    metrics: dict[str, dict[str, float]]
    zero_shot_metrics: dict[str, dict[str, float]]
    """The frozen pre-trained tiny CLIP without any PETL module, on the same test split."""
    chance_r1: float
    """Expected R@1 (%) of a random ranking on the synthetic test split."""
    gallery_index: Path
    """The held-out images (``test_query``: the val and test identities, none seen in training) indexed with
    the trained adapter, ready for ``upperson search`` / ``upperson serve``."""


def demo_config(data_root: Path, run_dir: Path, epochs: int, backbone: str) -> RunConfig:
    """UP-Person on the pre-trained tiny CLIP with settings that learn in about a CPU minute and a half.

    Paper settings (SDM, τ 0.02, Adam eps 1e-3, text masking, augmentation, cosine schedule) except
    the sizes, a 3x learning rate and a 1-epoch warm-up, because the run is 14 short epochs, not 60.
    """
    return RunConfig(
        method="up-person",
        backbone=backbone,
        model={"prefix_length": 4, "lora_rank": 8, "lambda_init": 10.0},
        data=DataConfig(
            dataset="cuhk-pedes",
            root=str(data_root),
            image_size=DEMO_IMAGE_SIZE,
            augment=True,
            text_mask_prob=0.15,
            num_workers=0,
        ),
        optim=OptimConfig(lr=3e-3, warmup_epochs=1),
        train=TrainConfig(epochs=epochs, batch_size=64, precision="fp32", select_on="val", log_every=1000),
        eval=EvalConfig(batch_size=256),
        output_dir=str(run_dir.parent),
        run_name=run_dir.name,
        device="cpu",
    )


def chance_r1(query_pids: torch.Tensor, gallery_pids: torch.Tensor) -> float:
    """Mean over queries of (#positives / gallery size), in percent."""
    positives = (query_pids[:, None] == gallery_pids[None, :]).float().sum(dim=1)
    return float((positives / gallery_pids.numel()).mean() * 100)


def run_demo(run_dir: Path, data_dir: Path, epochs: int | None = None, progress: Progress | None = None) -> DemoResult:
    """Generate (or reuse) the synthetic data, train, evaluate on test and draw the top-10 figure."""
    generate_synthetic_cuhk(data_dir)
    backbone = pretrained_tiny_clip(data_dir, progress=progress)
    config = demo_config(data_dir, run_dir, epochs or DEMO_EPOCHS, backbone=str(backbone))
    zero_shot = evaluate_split(
        build_inference_model(dataclasses.replace(config, method="zero-shot", model=None), adapter=None, device=torch.device("cpu")),
        load_dataset(config.data.dataset, config.data.root).split("test"),
        torch.device("cpu"),
        config.data.image_size,
        precision="fp32",
        progress=progress,
    )
    result = Trainer(config, run_dir, progress=progress).fit(overwrite=True)  # a previous demo run is moved aside
    assert result is not None  # no early stop requested
    model = build_inference_model(config, result.best_adapter, device=torch.device("cpu"))
    split = load_dataset(config.data.dataset, config.data.root).split("test")
    image_features, image_pids, text_features, text_pids = extract_features(
        model, split, torch.device("cpu"), config.data.image_size, precision="fp32"
    )
    figure = run_dir / "retrieval.png"
    queries = list(range(0, len(split.captions), max(1, len(split.captions) // FIGURE_QUERIES)))[:FIGURE_QUERIES]
    top = (text_features[queries] @ image_features.t()).topk(10, dim=1).indices  # [queries, 10]
    save_retrieval_figure(
        figure,
        [split.captions[q] for q in queries],
        [[split.image_paths[g] for g in row.tolist()] for row in top],
        [[bool(image_pids[g] == text_pids[q]) for g in row.tolist()] for q, row in zip(queries, top)],
    )
    gallery = run_dir / GALLERY_DIR  # the run directory is new (a previous demo was moved aside)
    shutil.copytree(Path(config.data.root) / "CUHK-PEDES" / "imgs" / "test_query", gallery)
    GalleryIndex.build(
        model,
        gallery,
        run_dir / GALLERY_INDEX_DIR,
        adapter=result.best_adapter,
        config_path=run_dir / CONFIG_FILE,
        image_size=config.data.image_size,
        precision="fp32",
        progress=progress,
    )
    return DemoResult(
        run_dir, result.best_adapter, figure, result.test_metrics, zero_shot, chance_r1(text_pids, image_pids), run_dir / GALLERY_INDEX_DIR
    )
