"""ONNX export of a trained model's two encoders, for runtimes without torch or upperson (the edge).

:func:`export_onnx` writes one directory:

* ``image_encoder.onnx``: ``images [N, 3, H, W] float32``, preprocessed as ``export.json["image"]``
  describes (the evaluation transforms) → ``features [N, D]``, the unnormalised projected feature
  that :meth:`RetrievalModel.encode_image` returns, and ``normalized_features [N, D]``, the same
  divided by its L2 norm;
* ``text_encoder.onnx``: ``token_ids [N, context] int64`` (``export.json["text"]`` says how to
  tokenise) → the same two outputs, pooled at each row's EOT token (``argmax`` of the ids);
* with ``quantize="int8"`` also ``image_encoder.int8.onnx`` and ``text_encoder.int8.onnx``:
  onnxruntime dynamic quantisation as :class:`Int8Scheme` describes (7-bit weights with one scale
  per output channel, uint8 activations quantised per call; each tower's first block and the
  projections stay fp32), whose integer arithmetic is the same on every x86 CPU, VNNI or not;
* ``export.json``: what a runtime needs (image size, resize, normalisation, tokenizer settings,
  embedding size, how to compare features), where the model came from (method, its config,
  backbone and adapter sha256, upperson version), the opset, every file with its sha256, and the
  parity measured against the torch model on random inputs, with the CPU that measured it.

The batch N is dynamic; LoRA is folded into the frozen weights (the model must be merged, as
:func:`~upperson.retrieval.factory.build_inference_model` returns it). Opset 18 and newer go
through torch's dynamo exporter (``torch.export``), opsets 14-17 through the TorchScript exporter;
both export ``scaled_dot_product_attention`` with the S-Prefix and CSKT's inserted tokens as they
are. Everything is written into a temporary sibling directory that is renamed into place at the
end, so an interrupted or refused export (fp32 below ``FP32_MIN_COSINE`` to torch, int8 below
``INT8_MIN_COSINE`` to fp32) leaves no half-written directory behind. An existing non-empty
directory is replaced only with ``overwrite`` and only if it is an earlier export: a valid
``export.json`` and nothing but the regular files it names (never a folder or a link, whatever its
name); only those files are deleted. ``out_dir`` itself must not be a symbolic link.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import stat
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

from upperson.data.transforms import describe_eval_transforms
from upperson.methods import RetrievalModel
from upperson.petl import PETLAttention
from upperson.retrieval.gallery import file_sha256
from upperson.runtime import cpu_flags
from upperson.tokenizer import EOT_TOKEN_ID, MASK_TOKEN_ID, SOT_TOKEN_ID, tokenizer_settings
from upperson.version import __version__

logger = logging.getLogger(__name__)

Tower = Literal["image", "text"]
Precision = Literal["fp32", "int8"]
Quantization = Literal["int8"]

TOWERS: tuple[Tower, ...] = ("image", "text")
INPUT_NAMES: dict[Tower, str] = {"image": "images", "text": "token_ids"}
OUTPUT_NAMES = ("features", "normalized_features")
MANIFEST_FILE = "export.json"
EXPORT_FORMAT = "upperson-onnx-export"
EXPORT_FORMAT_VERSION = 1
DEFAULT_OPSET = 18
DYNAMO_MIN_OPSET = 18
"""torch's dynamo exporter writes opset 18 and newer; lower opsets use the TorchScript exporter."""
MIN_OPSET = 14
"""``scaled_dot_product_attention`` has no ONNX form before opset 14."""
FP32_MIN_COSINE = 0.9999
"""An fp32 export whose features fall below this cosine to torch's on any parity input is refused."""
INT8_MIN_COSINE = 0.995
"""An int8 export whose features fall below this cosine to the fp32 file's on any parity input is refused."""
INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "avx512_bf16")
"""/proc/cpuinfo flags that decide which kernels onnxruntime's integer matmuls run (and how fast)."""
PARITY_SAMPLES = 4
"""Random images and captions the export checks itself on."""
_CHATTY_LOGGERS = ("", "onnxscript", "onnx_ir")
"""The ONNX optimiser logs every pass at INFO, onnxruntime's quantiser every tensor on the root logger ("")."""


def encoder_file(tower: Tower, precision: Precision = "fp32") -> str:
    """File name of one exported encoder: ``image_encoder.onnx``, ``text_encoder.int8.onnx``, ..."""
    return f"{tower}_encoder.onnx" if precision == "fp32" else f"{tower}_encoder.{precision}.onnx"


EXPORT_FILES = frozenset({MANIFEST_FILE} | {encoder_file(tower, p) for tower in TOWERS for p in ("fp32", "int8")})
"""Every file name an export writes; a manifest naming any other file is not trusted by ``overwrite``."""


@dataclass(frozen=True)
class Int8Scheme:
    """How ``--quantize int8`` quantises: onnxruntime's ``quantize_dynamic`` (int8 weights, uint8 activations per call).

    The defaults were chosen by measurement (README, *Export for the edge*). ``reduce_range`` is what
    makes the files safe on every x86 CPU: onnxruntime multiplies uint8 activations by int8 weights
    with ``VPMADDUBSW`` on CPUs without VNNI, which adds two products in a saturating int16. With
    8-bit weights that sum reaches 2 * 255 * 127 = 64,770 and saturates (measured on an emulated
    AVX2-only CPU: the tests' text features fell to cosine 0.979 of fp32); with 7-bit weights
    (|w| <= 64) it is at most 2 * 255 * 64 = 32,640 <= 32,767, so every CPU computes the same
    integers as one with VNNI. 7 bits double the weights' rounding error; leaving the first block
    (the one that loses most) and the projections in fp32 more than wins it back (ViT-B/16 text:
    1 - cosine 0.0024 -> 0.0010) at 0-15 % of the int8 speed (two runs on ViT-B/16).
    """

    per_channel: bool = True
    """One weight scale per output channel (else one per tensor)."""
    reduce_range: bool = True
    """7-bit weights: no int16 saturation on x86 CPUs without VNNI. Off, the result depends on the CPU."""
    fp32_first_blocks: int = 1
    """Transformer blocks at the input end of each tower whose matmuls stay fp32."""
    fp32_projections: bool = True
    """Keep the final image / text projections fp32 (they run on one row per input)."""

    def __post_init__(self) -> None:
        if self.fp32_first_blocks < 0:
            raise ValueError(f"Int8Scheme.fp32_first_blocks must be >= 0, got {self.fp32_first_blocks}")

    def describe(self) -> dict[str, Any]:
        """Every setting, as ``export.json`` records it."""
        return {
            "method": "onnxruntime.quantization.quantize_dynamic",
            "onnxruntime_version": onnxruntime.__version__,
            "weight_type": "QInt8",
            "weights": f"int8, symmetric, {'7 bits (|w| <= 64)' if self.reduce_range else '8 bits'}, "
            f"one scale per {'output channel' if self.per_channel else 'tensor'}",
            "activations": "uint8, asymmetric, one scale per tensor computed per call (DynamicQuantizeLinear)",
            **dataclasses.asdict(self),
            "saturation_free_without_vnni": self.reduce_range,
            "min_cosine_to_fp32": INT8_MIN_COSINE,
        }


DEFAULT_INT8_SCHEME = Int8Scheme()


@dataclass(frozen=True)
class Parity:
    """How far one runtime's features are from a reference's on the same inputs."""

    tower: Tower
    candidate: str
    """``onnx fp32`` or ``onnx int8``."""
    reference: str
    """``torch`` (the model exported) or ``onnx fp32``."""
    inputs: str
    """Which inputs, e.g. ``random`` or ``synthetic test split``."""
    samples: int
    max_abs_diff: float
    """Largest absolute difference of any unnormalised feature element."""
    min_cosine: float
    """Smallest cosine similarity of a sample's two feature vectors."""
    mean_cosine: float


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and measured."""

    out_dir: Path
    files: dict[str, str]
    """File name → sha256, ``export.json`` excluded."""
    parity: list[Parity]
    """Random-input parity: each fp32 encoder against torch, each int8 encoder against fp32."""
    manifest: dict[str, Any]
    """The contents of ``export.json``."""


class OnnxEncoders:
    """The two exported encoders of one precision in onnxruntime sessions.

    Args:
        image_path: the image encoder file.
        text_path: the text encoder file.
        providers: onnxruntime execution providers, in order of preference.
        threads: intra-op threads (default: onnxruntime's, all cores).
    """

    def __init__(
        self,
        image_path: str | os.PathLike[str],
        text_path: str | os.PathLike[str],
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
    ) -> None:
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.sessions = {
            tower: onnxruntime.InferenceSession(str(path), options, providers=list(providers))
            for tower, path in (("image", image_path), ("text", text_path))
        }

    @classmethod
    def load(
        cls,
        export_dir: str | os.PathLike[str],
        precision: Precision = "fp32",
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
    ) -> OnnxEncoders:
        """The encoders of an export directory, after checking their sha256 against ``export.json``."""
        export_dir = Path(export_dir)
        files = read_manifest(export_dir)["files"]
        paths = []
        for tower in TOWERS:
            name = encoder_file(tower, precision)
            if name not in files:
                raise ValueError(f"{export_dir} has no {precision} {tower} encoder ({name}); export it with --quantize {precision}")
            if file_sha256(export_dir / name) != files[name]["sha256"]:
                raise ValueError(f"{export_dir / name}: sha256 differs from {MANIFEST_FILE}'s; the file changed after export")
            paths.append(export_dir / name)
        return cls(*paths, providers=providers, threads=threads)

    def encode_image(self, images: np.ndarray) -> np.ndarray:
        """``[N, 3, H, W]`` float32 preprocessed images → ``[N, D]`` unnormalised features."""
        return self._run("image", np.ascontiguousarray(images, dtype=np.float32))[0]

    def encode_text(self, token_ids: np.ndarray) -> np.ndarray:
        """``[N, context]`` int64 token ids → ``[N, D]`` unnormalised features."""
        return self._run("text", np.ascontiguousarray(token_ids, dtype=np.int64))[0]

    def _run(self, tower: Tower, inputs: np.ndarray) -> list[np.ndarray]:
        return self.sessions[tower].run(list(OUTPUT_NAMES), {INPUT_NAMES[tower]: inputs})


class _EncoderGraph(nn.Module):
    """One encoder of a model as the exported graph: input → (features, L2-normalised features)."""

    def __init__(self, model: RetrievalModel, tower: Tower) -> None:
        super().__init__()
        self.model = model
        self.tower = tower

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encode = self.model.encode_image if self.tower == "image" else self.model.encode_text
        features = encode(inputs)  # [N, D]
        return features, F.normalize(features, dim=-1)


def export_onnx(
    model: RetrievalModel,
    out_dir: str | os.PathLike[str],
    *,
    adapter: str | os.PathLike[str] | None = None,
    opset: int | None = None,
    quantize: Quantization | None = None,
    int8_scheme: Int8Scheme = DEFAULT_INT8_SCHEME,
    overwrite: bool = False,
    parity_samples: int = PARITY_SAMPLES,
    seed: int = 0,
) -> ExportReport:
    """Write ``model``'s image and text encoders as ONNX files plus ``export.json`` into ``out_dir``.

    Args:
        model: an eval-mode fp32 model on the CPU with LoRA merged (`build_inference_model` makes one).
        out_dir: a new or empty directory (or, with ``overwrite``, an earlier export's).
        adapter: the adapter file the model holds; its sha256 goes into ``export.json``.
        opset: ONNX opset, at least 14 (18 and newer use the dynamo exporter); default ``DEFAULT_OPSET``.
        quantize: ``"int8"`` also writes dynamically quantised encoders.
        int8_scheme: how they are quantised.
        overwrite: replace an earlier export in ``out_dir``.
        parity_samples: random images and captions the export is checked on.
        seed: seed of those random inputs.

    Raises:
        ValueError: the model cannot be exported as it is, ``out_dir`` is not usable, the fp32
            files disagree with torch (min cosine below ``FP32_MIN_COSINE``) or the int8 files with
            fp32 (below ``INT8_MIN_COSINE``); nothing is written then.
    """
    _check_exportable(model)
    opset = DEFAULT_OPSET if opset is None else opset
    if opset < MIN_OPSET:
        raise ValueError(f"--opset {opset} is too old: scaled_dot_product_attention needs opset {MIN_OPSET} or newer")
    if quantize not in (None, "int8"):
        raise ValueError(f"unknown quantisation {quantize!r}; supported: 'int8'")
    if parity_samples < 1:
        raise ValueError(f"parity_samples must be >= 1, got {parity_samples}")
    out = Path(out_dir)
    check_export_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        with _quiet(_CHATTY_LOGGERS):
            precisions: list[Precision] = ["fp32"] + ([quantize] if quantize else [])
            fp32_nodes = _write_encoders(model, staging, opset, int8_scheme if quantize else None)
            runtimes = {precision: OnnxEncoders(*(staging / encoder_file(t, precision) for t in TOWERS)) for precision in precisions}
            parity = measure_parity(model, runtimes, *random_inputs(model, parity_samples, seed), inputs="random")
        check_parity(parity)
        files = {path.name: file_sha256(path) for path in sorted(staging.iterdir())}
        int8 = {"int8": {**int8_scheme.describe(), "fp32_nodes": fp32_nodes}} if quantize else None
        manifest = export_manifest(model, adapter, opset, files, staging, parity, int8)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        _publish(staging, out, overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return ExportReport(out, files, parity, manifest)


def _write_encoders(model: RetrievalModel, directory: Path, opset: int, int8: Int8Scheme | None) -> dict[Tower, list[str]]:
    """Export both towers (and quantise them with ``int8``); returns each int8 file's nodes left in fp32."""
    fp32_nodes: dict[Tower, list[str]] = {}
    for tower in TOWERS:
        source = directory / encoder_file(tower)
        _export_encoder(model, tower, source, opset)
        if int8 is not None:
            fp32_nodes[tower] = nodes_of_weights(source, fp32_weights(model, tower, int8))
            quantize_int8(source, directory / encoder_file(tower, "int8"), int8, fp32_nodes[tower])
    return fp32_nodes


@contextmanager
def _quiet(names: Sequence[str], level: int = logging.WARNING) -> Iterator[None]:
    """Raise the given loggers to ``level`` (not lower than they are) for the duration."""
    loggers = [logging.getLogger(name) for name in names]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), level))
    try:
        yield
    finally:
        for logger, old in zip(loggers, previous):
            logger.setLevel(old)


def check_export_dir(out: Path, overwrite: bool) -> list[str]:
    """Refuse an ``out`` the export may not write; returns the earlier export's files ``overwrite`` replaces.

    ``out`` must be new, an empty directory, or (with ``overwrite``) an earlier export as
    :func:`earlier_export_files` checks it; a symbolic link is refused whatever it points to, so
    nothing is ever written or removed through one.
    """
    if out.is_symlink():
        raise ValueError(
            f"--out {out} is a symbolic link (to {os.readlink(out)}); export does not write through links: "
            f"give the directory itself (--out {out.resolve()}) or a new one"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a new or empty directory")
    if not out.is_dir():
        return []
    entries = sorted(entry.name for entry in out.iterdir())
    if not entries:
        return []
    if not overwrite:
        raise ValueError(f"--out {out} is not empty ({', '.join(entries[:5])}); pass --overwrite to replace an earlier export, or give a new or empty directory")
    replaceable = earlier_export_files(out)
    foreign = [name for name in entries if name not in replaceable]
    if foreign:
        raise ValueError(
            f"--overwrite replaces only the files an earlier export's {MANIFEST_FILE} names, but {MANIFEST_FILE} does not name "
            f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''} in {out}; move them away or give a new or empty directory"
        )
    return replaceable


def earlier_export_files(out: Path) -> list[str]:
    """``export.json`` and the files it names, if ``out`` holds an earlier export that ``overwrite`` may replace.

    The manifest must be a regular file that :func:`read_manifest` accepts, and every file it names
    an export file name (``EXPORT_FILES``) that is a regular file or absent: a folder or a symbolic
    link is refused whatever its name, so nothing outside the export is ever followed or deleted.
    """
    manifest_path = out / MANIFEST_FILE
    advice = "move it away or give a new or empty directory"
    if not manifest_path.exists() and not manifest_path.is_symlink():
        raise ValueError(f"--overwrite replaces only an earlier export, but {out} has no {MANIFEST_FILE}; move its files away or give a new or empty directory")
    _refuse_unless_regular_file(manifest_path, advice)
    try:
        files = read_manifest(out).get("files")
    except (OSError, ValueError) as error:  # JSON and UTF-8 decoding errors are ValueErrors
        raise ValueError(f"--overwrite replaces only an earlier export, but {manifest_path} is not an upperson ONNX export manifest ({error}); {advice}") from error
    if not isinstance(files, dict) or not set(files) <= EXPORT_FILES - {MANIFEST_FILE}:
        raise ValueError(f"--overwrite: {manifest_path} names files no export writes ({files!r:.80}); {advice}")
    named = sorted(name for name in files if (out / name).exists() or (out / name).is_symlink())
    for name in named:
        _refuse_unless_regular_file(out / name, advice)
    return [MANIFEST_FILE, *named]


def _refuse_unless_regular_file(path: Path, advice: str) -> None:
    mode = os.lstat(path).st_mode
    if stat.S_ISREG(mode):
        return
    kind = "a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode) else "not a regular file"
    raise ValueError(f"--overwrite replaces only an earlier export's files, but {path} is {kind}; {advice}")


def _check_exportable(model: RetrievalModel) -> None:
    if model.training:
        raise ValueError("export needs an eval-mode model: build it with build_inference_model (or call model.eval())")
    tensors = [*model.parameters(), *model.buffers()]
    if any(tensor.device.type != "cpu" for tensor in tensors):
        raise ValueError("export runs on the CPU: build the model with device='cpu'")
    if any(tensor.is_floating_point() and tensor.dtype != torch.float32 for tensor in tensors):
        raise ValueError("export needs fp32 weights (the ONNX files are fp32; int8 comes from --quantize int8)")
    if any(isinstance(m, PETLAttention) and m.lora is not None and not m.lora_merged for m in model.modules()):
        raise ValueError("export needs LoRA merged into the frozen weights: call model.merge_lora() (build_inference_model does)")


def _export_encoder(model: RetrievalModel, tower: Tower, path: Path, opset: int) -> None:
    graph = _EncoderGraph(model, tower).eval()
    example = example_inputs(model, tower, batch=2)  # batch 2: a batch of 1 would be specialised
    input_name = INPUT_NAMES[tower]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation and constant-folding notes, not about the model
        if opset >= DYNAMO_MIN_OPSET:
            torch.onnx.export(
                graph, (example,), str(path), input_names=[input_name], output_names=list(OUTPUT_NAMES),
                dynamic_shapes={"inputs": {0: torch.export.Dim("batch", min=1)}},
                opset_version=opset, dynamo=True, external_data=False, verbose=False,
            )
        else:
            torch.onnx.export(
                graph, (example,), str(path), input_names=[input_name], output_names=list(OUTPUT_NAMES),
                dynamic_axes={name: {0: "batch"} for name in (input_name, *OUTPUT_NAMES)},
                opset_version=opset, dynamo=False,
            )
    onnx.checker.check_model(str(path))


def exporter_name(opset: int) -> str:
    return "torch.onnx.export (dynamo)" if opset >= DYNAMO_MIN_OPSET else "torch.onnx.export (TorchScript)"


def quantize_int8(source: Path, target: Path, scheme: Int8Scheme, fp32_nodes: Sequence[str] = ()) -> None:
    """onnxruntime dynamic quantisation of ``source`` as ``scheme`` says, ``fp32_nodes`` left as they are.

    onnxruntime's advice to pre-process the model first (``quant_pre_process``) is silenced:
    measured on ViT-B/16, it changed no feature and no speed.
    """
    with _quiet([""], logging.ERROR):
        quantize_dynamic(
            source, target, weight_type=QuantType.QInt8, per_channel=scheme.per_channel,
            reduce_range=scheme.reduce_range, nodes_to_exclude=list(fp32_nodes),
        )


def fp32_weights(model: RetrievalModel, tower: Tower, scheme: Int8Scheme) -> list[torch.Tensor]:
    """The weights whose matmuls ``scheme`` keeps in fp32: the tower's first blocks' and its projection."""
    transformer, projection = (
        (model.clip.visual.transformer, model.clip.visual.proj) if tower == "image" else (model.clip.transformer, model.clip.text_projection)
    )
    weights = [p for block in transformer.resblocks[: scheme.fp32_first_blocks] for p in block.parameters() if p.dim() == 2]
    return weights + ([projection] if scheme.fp32_projections and projection is not None else [])


def nodes_of_weights(path: Path, weights: Sequence[torch.Tensor]) -> list[str]:
    """Names of the MatMul / Gemm / Conv nodes of ``path`` whose constant operand is one of ``weights``.

    Matched by value (as stored or transposed, as ``nn.Linear`` exports), so it does not depend on
    how an exporter names nodes. All-zero weights are skipped: int8 holds them exactly, and they
    would match every other zero weight (an untrained adapter's up-projection).
    """
    wanted = set()
    for weight in weights:
        array = weight.detach().numpy()
        if array.any():
            wanted |= {_fingerprint(array), _fingerprint(array.T)}
    graph = onnx.load(str(path)).graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    fingerprints: dict[str, tuple[tuple[int, ...], str]] = {}
    names = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        for name in (name for name in node.input if name in constants):
            if name not in fingerprints:
                fingerprints[name] = _fingerprint(numpy_helper.to_array(constants[name]))
            if fingerprints[name] in wanted:
                names.append(node.name)
                break
    return names


def _fingerprint(array: np.ndarray) -> tuple[tuple[int, ...], str]:
    return array.shape, hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def example_inputs(model: RetrievalModel, tower: Tower, batch: int) -> torch.Tensor:
    """Valid inputs of the right shape for one encoder (zero images; SOT-EOT captions)."""
    if tower == "image":
        return torch.zeros(batch, 3, *model.backbone_spec.image_size)
    token_ids = torch.zeros(batch, model.backbone_spec.context_length, dtype=torch.long)
    token_ids[:, 0], token_ids[:, 1] = SOT_TOKEN_ID, EOT_TOKEN_ID
    return token_ids


def random_inputs(model: RetrievalModel, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` N(0, 1) images and captions of random word ids with lengths spread from 0 to full.

    The captions put EOT everywhere from position 1 to the last, so pooling is checked at every
    length, including the longest.
    """
    return random_inputs_of_size(model.backbone_spec.image_size, model.backbone_spec.context_length, count, seed)


def random_inputs_of_size(image_size: Sequence[int], context: int, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`random_inputs` for ``image_size`` (height, width) and ``context`` tokens, without the model."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, *image_size, generator=generator)
    token_ids = torch.zeros(count, context, dtype=torch.long)
    lengths = torch.linspace(0, context - 2, count).round().long()  # words per caption
    for row, length in enumerate(lengths.tolist()):
        words = torch.randint(0, MASK_TOKEN_ID, (length,), generator=generator)
        token_ids[row, : length + 2] = torch.cat([torch.tensor([SOT_TOKEN_ID]), words, torch.tensor([EOT_TOKEN_ID])])
    return images, token_ids


def integer_matmul(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``uint8 [M, K] @ int8 [K, N] -> int32`` by onnxruntime's CPU kernel (MatMulInteger), as quantised graphs run it."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "integer_matmul",
        [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.UINT8, list(activations.shape))],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [activations.shape[0], weights.shape[1]])],
        [numpy_helper.from_array(weights.astype(np.int8), "b")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"a": activations.astype(np.uint8)})[0]


def u8s8_saturates(weight: int = 127) -> bool:
    """Whether this CPU's uint8 x int8 kernel clips 255 * ``weight`` products, summed in pairs, to int16.

    True on x86 CPUs without VNNI (``VPMADDUBSW``) for ``weight`` 127, so it tells which kernel
    onnxruntime runs here, also where /proc/cpuinfo does not tell (under an emulator); never for
    64, the most a 7-bit (``reduce_range``) weight reaches. The product is 16 x 64 @ 64 x 16, large
    enough for onnxruntime's packed GEMM kernels.
    """
    activations = np.full((16, 64), 255, dtype=np.uint8)
    weights = np.full((64, 16), weight, dtype=np.int8)
    exact = activations.astype(np.int64) @ weights.astype(np.int64)
    return not np.array_equal(integer_matmul(activations, weights), exact)


def compare_features(candidate: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    """``(max |a - b|, min cosine, mean cosine)`` over the rows of two ``[N, D]`` feature arrays."""
    candidate, reference = candidate.astype(np.float64), reference.astype(np.float64)
    cosine = (candidate * reference).sum(1) / (np.linalg.norm(candidate, axis=1) * np.linalg.norm(reference, axis=1))
    return float(np.abs(candidate - reference).max()), float(cosine.min()), float(cosine.mean())


@torch.no_grad()
def measure_parity(
    model: RetrievalModel,
    runtimes: dict[str, OnnxEncoders],
    images: torch.Tensor,
    token_ids: torch.Tensor,
    inputs: str,
    batch_size: int = 64,
) -> list[Parity]:
    """Compare ``runtimes["fp32"]`` with the torch model, and ``runtimes["int8"]`` (if given) with fp32."""
    model_inputs: dict[Tower, torch.Tensor] = {"image": images, "text": token_ids}
    results = []
    for tower in TOWERS:
        batches = model_inputs[tower].split(batch_size)
        encode = model.encode_image if tower == "image" else model.encode_text
        features = {"torch": torch.cat([encode(batch) for batch in batches]).numpy()}
        for precision, runtime in runtimes.items():
            run = runtime.encode_image if tower == "image" else runtime.encode_text
            features[f"onnx {precision}"] = np.concatenate([run(batch.numpy()) for batch in batches])
        for candidate in (name for name in features if name != "torch"):
            reference = "torch" if candidate == "onnx fp32" else "onnx fp32"
            max_abs, min_cos, mean_cos = compare_features(features[candidate], features[reference])
            results.append(Parity(tower, candidate, reference, inputs, len(features[candidate]), max_abs, min_cos, mean_cos))
    return results


def check_parity(parity: Sequence[Parity]) -> None:
    """Refuse fp32 files below ``FP32_MIN_COSINE`` to torch and int8 files below ``INT8_MIN_COSINE`` to fp32."""
    fp32 = [p for p in parity if p.candidate == "onnx fp32" and p.min_cosine < FP32_MIN_COSINE]
    if fp32:
        worst = min(fp32, key=lambda p: p.min_cosine)
        raise ValueError(
            f"the exported {worst.tower} encoder disagrees with torch (min cosine {worst.min_cosine:.6f} < {FP32_MIN_COSINE}, "
            f"max abs diff {worst.max_abs_diff:.3g}); nothing was written. Try another --opset, and report it with -v"
        )
    int8 = [p for p in parity if p.candidate == "onnx int8" and p.min_cosine < INT8_MIN_COSINE]
    if int8:
        worst = min(int8, key=lambda p: p.min_cosine)
        raise ValueError(
            f"the int8 {worst.tower} encoder is too far from fp32 (min cosine {worst.min_cosine:.5f} < {INT8_MIN_COSINE} on "
            f"{worst.samples} {worst.inputs} inputs, max abs diff {worst.max_abs_diff:.3g}, measured on this CPU ({int8_kernel()})); "
            "nothing was written. Export without --quantize, and report it with -v"
        )


def int8_kernel() -> str:
    """This CPU and the kind of uint8 x int8 kernel onnxruntime runs on it, as one phrase."""
    kernel = "no VNNI (u8s8 pairs summed in int16)" if u8s8_saturates() else "VNNI or exact u8s8"
    return f"{_cpu_model_name()}, int8 kernel: {kernel}"


def machine_description() -> dict[str, Any]:
    """The CPU running this process: model name, visible cores, and which of ``INT8_CPU_FLAGS`` it has."""
    flags = cpu_flags()
    return {"cpu": _cpu_model_name(), "cores": os.cpu_count(), "int8_flags": {flag: flag in flags for flag in INT8_CPU_FLAGS}}


def _cpu_model_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())


def export_manifest(
    model: RetrievalModel,
    adapter: str | os.PathLike[str] | None,
    opset: int,
    files: dict[str, str],
    directory: Path,
    parity: list[Parity],
    quantization: dict[str, Any] | None,
) -> dict[str, Any]:
    """The contents of ``export.json``; ``quantization`` maps each quantised precision to its settings."""
    spec = model.backbone_spec
    height, width = spec.image_size
    context = spec.context_length
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "upperson_version": __version__,
        "torch_version": torch.__version__,
        "exporter": exporter_name(opset),
        "opset": opset,
        "method": model.method,
        "method_config": dataclasses.asdict(model.config) if dataclasses.is_dataclass(model.config) else None,
        "backbone_source": model.backbone_source,
        "backbone_sha256": model.backbone_sha256,
        "adapter": Path(adapter).name if adapter is not None else None,
        "adapter_sha256": file_sha256(adapter) if adapter is not None else None,
        "lora_merged": True,
        "embed_dim": spec.embed_dim,
        "image": {"height": height, "width": width, **describe_eval_transforms((height, width))},
        "text": {
            **tokenizer_settings(context),
            "pooling": "the text encoder reads each row's EOT at argmax(token_ids): EOT must be the largest id in the row",
        },
        "encoders": {
            tower: {
                "input": {
                    "name": INPUT_NAMES[tower],
                    "shape": ["N", 3, height, width] if tower == "image" else ["N", context],
                    "dtype": "float32" if tower == "image" else "int64",
                },
                "outputs": {name: {"shape": ["N", spec.embed_dim], "dtype": "float32"} for name in OUTPUT_NAMES},
                "files": {precision: encoder_file(tower, precision) for precision in ("fp32", *(quantization or {}))},
            }
            for tower in TOWERS
        },
        "outputs": {
            "features": "unnormalised projected CLS (image) / EOT (text) features, as RetrievalModel.encode_image / encode_text",
            "normalized_features": "features / ||features||_2",
        },
        "similarity": "cosine: L2-normalise both sides (normalized_features) and rank gallery images by the dot product with a text query",
        "quantization": quantization,
        "files": {
            name: {"sha256": digest, "bytes": (directory / name).stat().st_size} for name, digest in files.items()
        },
        "parity": [dataclasses.asdict(item) for item in parity],
        "parity_measured_on": {**machine_description(), "onnxruntime_version": onnxruntime.__version__, "u8s8_saturates": u8s8_saturates()},
    }


def read_manifest(export_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``export.json`` of an export directory, checked to be one."""
    path = Path(export_dir) / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not an upperson ONNX export manifest")
    if manifest.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ValueError(f"{path}: export format version {manifest.get('format_version')}, this upperson reads {EXPORT_FORMAT_VERSION}")
    return manifest


def _publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``staging`` directory to ``out``; an earlier export there is moved aside, then its files removed.

    Only the files :func:`check_export_dir` found replaceable are deleted; anything that appeared in
    ``out`` since is kept in the moved-aside directory, which is then left in place and logged.
    """
    replaceable = check_export_dir(out, overwrite)  # again: the directory may have changed during the export
    if not replaceable:
        if out.is_dir():
            out.rmdir()  # empty: os.rename onto a directory is not portable
        os.rename(staging, out)
        return
    retired = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:12]}"
    os.rename(out, retired)
    os.rename(staging, out)
    for name in replaceable:
        path = retired / name
        if path.is_symlink() or path.is_file():  # unlink removes a link itself, never what it points to
            path.unlink()
    try:
        retired.rmdir()
    except OSError:
        logger.warning("%s held files that appeared during the export; they were kept in %s", out, retired)
