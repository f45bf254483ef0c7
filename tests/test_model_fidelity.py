"""The model families score real images exactly as the authors' pipelines would.

Each test writes a checkpoint in the published format (tests/checkpoints.py), loads it through
the family's loader, and compares the scores with a reference written here from the authors'
description: its own torchvision preprocessing, its own copy of the weights and its own head
arithmetic, fed ``Image.open(path).convert("RGB")`` as the authors' code is. The loader gets
the decoded image in its original mode (RGBA, L), so its own RGB conversion is checked too.

Images: four from the shared corpus: a landscape JPEG, a landscape PNG, a PNG with an alpha
channel, and a portrait JPEG. The corpus has no greyscale image, so the portrait is
converted to greyscale (mode L) and saved as JPEG: it stands for both.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from workers.detectors.base import Detector, DetectorSpec, DetectorUnavailable, derive_version
from workers.detectors.options import SumsubOptions
from workers.detectors.torch_models import (
    DetectorOptionsError,
    TorchDetector,
    commfor_module,
    load_commfor,
    load_sumsub,
    load_timm,
    sumsub_module,
    timm_data_config,
)
from workers.detectors.torch_models.runtime import check_autocast
from workers.detectors.weights import CheckpointFormatError, WeightsIntegrityError, sha256_file

from checkpoints import (
    COMMFOR_VIT_224,
    COMMFOR_VIT_384,
    CONVNEXT_STAND_IN,
    SUMSUB_CONVNEXT,
    SUMSUB_MOBILENET,
    CommForReference,
    SumsubReference,
    write_commfor_hub_folder,
    write_commfor_training_checkpoint,
    write_sumsub_lightning,
    write_sumsub_raw,
)

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The ConvNeXt-L tag's data config, spelled out for the small ConvNeXt that stands in for it.
CONVNEXT_L_PREPROCESSING = {
    "input_size": [3, 384, 384],
    "interpolation": "bicubic",
    "crop_pct": 1.0,
    "crop_mode": "squash",
    "mean": list(CLIP_MEAN),
    "std": list(CLIP_STD),
}

CORPUS_FILES = (
    "c2pa_no_alg.jpg",  # JPEG, landscape 480x270
    "comfy_input_sunset.png",  # PNG, landscape 1024x682
    "a1111_stealth_pnginfo_64px.png",  # PNG with alpha (RGBA), 64x64
)
GREYSCALE_SOURCE = "iptc_trainedAlgorithmicMedia.jpg"  # JPEG, portrait 697x1000


@pytest.fixture(autouse=True, scope="module")
def _two_threads() -> None:
    torch.set_num_threads(2)


@dataclass(frozen=True)
class CorpusImage:
    name: str
    path: Path

    def as_decoded(self) -> Image.Image:
        """What the worker hands a detector: the decoded image, in its own mode."""
        with Image.open(self.path) as image:
            image.load()
            return image.copy()

    def as_authors_read_it(self) -> Image.Image:
        with Image.open(self.path) as image:
            return image.convert("RGB")


@pytest.fixture(scope="module")
def corpus_images(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[CorpusImage]:
    with (corpus_dir / "MANIFEST.tsv").open(newline="") as manifest:
        listed = {row["file"] for row in csv.DictReader(manifest, delimiter="\t")}
    missing = [name for name in (*CORPUS_FILES, GREYSCALE_SOURCE) if f"images/{name}" not in listed]
    if missing:
        pytest.skip(f"corpus MANIFEST.tsv lacks {missing}: the corpus changed under these tests")
    images = [CorpusImage(name, corpus_dir / "images" / name) for name in CORPUS_FILES]

    grey = tmp_path_factory.mktemp("greyscale") / "iptc_portrait_greyscale.jpg"
    with Image.open(corpus_dir / "images" / GREYSCALE_SOURCE) as source:
        source.convert("L").save(grey, quality=92)
    images.append(CorpusImage(grey.name, grey))

    decoded = [image.as_decoded() for image in images]
    assert {"RGB", "RGBA", "L"} <= {image.mode for image in decoded}
    formats = set()
    for image in images:
        with Image.open(image.path) as opened:
            formats.add(opened.format)
    assert formats == {"JPEG", "PNG"}
    assert any(image.height > image.width for image in decoded)
    assert any(image.width > image.height for image in decoded)
    return images


# --------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------

Preprocess = Callable[[Image.Image], torch.Tensor]


def clip_squash_384() -> Preprocess:
    """Sumsub ConvNeXt: 384x384 bicubic, aspect ratio not kept, CLIP statistics."""
    return T.Compose(
        [
            T.Resize((384, 384), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def mobilenet_224() -> Preprocess:
    """Sumsub MobileNet: timm's values for tf_mobilenetv3_large_100.in1k, torchvision ops."""
    return T.Compose(
        [
            T.Resize(int(224 / 0.875), interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )


def commfor_eval(resize: int, crop: int, mean: Sequence[float] = IMAGENET_MEAN) -> Preprocess:
    """Community Forensics main-branch eval transform."""
    return T.Compose(
        [T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(mean, IMAGENET_STD)]
    )


class SumsubReferenceScorer:
    """The card's model from the ``model.*`` weights: a timm backbone (built on the meta
    device and given the weights directly, to save a random initialisation) and the head
    by hand, one image at a time as the card's pipeline does."""

    def __init__(self, state: dict[str, torch.Tensor], backbone: str) -> None:
        with torch.device("meta"):
            self.net = timm.create_model(backbone, pretrained=False, num_classes=0)
        body = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        self.net.load_state_dict(body, assign=True)
        self.net.eval()
        self.state = state

    def scores(
        self, preprocess: Preprocess, images: Sequence[CorpusImage], ai_index: int = 1
    ) -> list[float]:
        state, scores = self.state, []
        with torch.no_grad():
            for image in images:
                features = self.net(preprocess(image.as_authors_read_it()).unsqueeze(0))
                hidden = F.relu(F.linear(features, state["clf.0.weight"], state["clf.0.bias"]))
                logits = F.linear(hidden, state["clf.2.weight"], state["clf.2.bias"])
                scores.append(float(torch.softmax(logits, dim=1)[0, ai_index]))
        return scores


class CommForReferenceScorer:
    """The ViT's pooled token from the ``vit.*`` weights, then ``sigmoid(w . f + b)``."""

    def __init__(self, state: dict[str, torch.Tensor], backbone: str) -> None:
        with torch.device("meta"):
            self.net = timm.create_model(backbone, pretrained=False, num_classes=0)
        body = {
            k.removeprefix("vit."): v for k, v in state.items() if not k.startswith("vit.head.")
        }
        self.net.load_state_dict(body, assign=True)
        self.net.eval()
        self.weight, self.bias = state["vit.head.weight"][0], state["vit.head.bias"][0]

    def scores(self, preprocess: Preprocess, images: Sequence[CorpusImage]) -> list[float]:
        scores = []
        with torch.no_grad():
            for image in images:
                features = self.net(preprocess(image.as_authors_read_it()).unsqueeze(0))
                scores.append(float(torch.sigmoid(features[0] @ self.weight + self.bias)))
        return scores


def detector_scores(detector: Detector, images: Sequence[CorpusImage]) -> list[float]:
    outputs = detector.detect_batch([image.as_decoded() for image in images], [b""] * len(images))
    assert len(outputs) == len(images)
    scores = [output.score for output in outputs]
    assert all(score is not None for score in scores), outputs
    return [float(score) for score in scores if score is not None]


def assert_faithful(
    detector: Detector,
    images: Sequence[CorpusImage],
    reference: Sequence[float],
    wrong_reference: Sequence[float],
) -> None:
    """Batched scores match the reference, one-at-a-time scores match the batch, the scores
    are spread (not all ~0.5), and a reference with one preprocessing step wrong (given for
    the first images only, to save time) does *not* match: the tolerance tells a faithful
    pipeline from a near miss."""
    batched = detector_scores(detector, images)
    single = [detector_scores(detector, [image])[0] for image in images]
    for name, got, want, alone in zip(
        [image.name for image in images], batched, reference, single, strict=True
    ):
        assert abs(got - want) <= TOLERANCE, (name, got, want)
        assert abs(got - alone) <= TOLERANCE, (name, got, alone)
    assert all(0.02 < score < 0.98 for score in batched), batched
    assert max(batched) - min(batched) > 0.1, batched
    near_miss = max(abs(a - b) for a, b in zip(batched, wrong_reference, strict=False))
    assert near_miss > 10 * TOLERANCE, near_miss


def spec(family: str, **options: object) -> DetectorSpec:
    return DetectorSpec(name=f"test-{family}", family=family, version="1", options=options)


# --------------------------------------------------------------------------------------------
# Sumsub
# --------------------------------------------------------------------------------------------


def test_sumsub_convnext_pipeline_matches_the_card(
    corpus_images: list[CorpusImage], tmp_path: Path
) -> None:
    """Raw ``synthetic.pt`` state dict; ConvNeXt structure (small stand-in for ConvNeXt-L)
    with ConvNeXt-L's preprocessing: 384 squash, bicubic, CLIP statistics."""
    state = write_sumsub_raw(tmp_path / "synthetic.pt", CONVNEXT_STAND_IN)
    detector = load_sumsub(
        spec("sumsub", backbone=CONVNEXT_STAND_IN, **CONVNEXT_L_PREPROCESSING),
        device="cpu",
        weights_path=tmp_path / "synthetic.pt",
    )
    scorer = SumsubReferenceScorer(state, CONVNEXT_STAND_IN)
    reference = scorer.scores(clip_squash_384(), corpus_images)
    # Near miss: keep the aspect ratio (shorter side 384 + centre crop) instead of squashing.
    keep_aspect = T.Compose(
        [
            T.Resize(384, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(384),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    wrong = scorer.scores(keep_aspect, corpus_images[:2])
    assert_faithful(detector, corpus_images, reference, wrong)
    assert isinstance(detector, TorchDetector)
    assert detector.input_size == (3, 384, 384)


def test_sumsub_mobilenet_lightning_checkpoint_matches_timm_config(
    corpus_images: list[CorpusImage], tmp_path: Path
) -> None:
    """Lightning checkpoint of the real MobileNetV3-L; preprocessing resolved from the tag
    alone (no overrides): 224, bilinear, crop 0.875, mean/std 0.5."""
    state = write_sumsub_lightning(tmp_path / "last.ckpt", SUMSUB_MOBILENET)
    detector = load_sumsub(
        spec("sumsub", backbone=SUMSUB_MOBILENET), device="cpu", weights_path=tmp_path / "last.ckpt"
    )
    scorer = SumsubReferenceScorer(state, SUMSUB_MOBILENET)
    reference = scorer.scores(mobilenet_224(), corpus_images)
    # Near miss: ImageNet statistics instead of the tag's 0.5.
    imagenet = T.Compose(
        [*mobilenet_224().transforms[:3], T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    wrong = scorer.scores(imagenet, corpus_images[:2])
    assert_faithful(detector, corpus_images, reference, wrong)


def mobilenet(weights: Path, **options: object) -> TorchDetector:
    """A Sumsub MobileNetV3-L detector on the CPU from ``weights``, with ``options``."""
    detector = load_sumsub(
        spec("sumsub", backbone=SUMSUB_MOBILENET, **options), device="cpu", weights_path=weights
    )
    assert isinstance(detector, TorchDetector)
    return detector


def test_channels_last_on_the_cpu_where_it_was_measured_faster(
    corpus_images: list[CorpusImage], tmp_path: Path
) -> None:
    """MobileNetV3 runs channels-last on the CPU by default, ConvNeXt does not; the option
    overrides either way, and the layout does not move the scores."""
    write_sumsub_raw(tmp_path / "mobilenet.pt", SUMSUB_MOBILENET)
    write_sumsub_raw(tmp_path / "convnext.pt", CONVNEXT_STAND_IN)

    def layout(detector: Detector) -> bool:
        assert isinstance(detector, TorchDetector)
        batch = detector.collate([torch.rand(detector.input_size) for _ in range(2)])
        staged = detector.to_device(batch).tensor
        return staged.is_contiguous(memory_format=torch.channels_last)

    weights = tmp_path / "mobilenet.pt"
    default, contiguous = mobilenet(weights), mobilenet(weights, channels_last=False)
    convnext = load_sumsub(
        spec("sumsub", backbone=CONVNEXT_STAND_IN),
        device="cpu",
        weights_path=tmp_path / "convnext.pt",
    )
    forced = load_sumsub(
        spec("sumsub", backbone=CONVNEXT_STAND_IN, channels_last=True),
        device="cpu",
        weights_path=tmp_path / "convnext.pt",
    )
    assert [layout(d) for d in (default, contiguous, convnext, forced)] == [
        True,
        False,
        False,
        True,
    ]
    images = corpus_images[:6]
    for got, want in zip(
        detector_scores(default, images), detector_scores(contiguous, images), strict=True
    ):
        assert abs(got - want) <= TOLERANCE, (got, want)
    with pytest.raises(DetectorOptionsError, match="channels_last"):
        mobilenet(weights, channels_last="yes")


def test_large_inputs_on_the_cpu_go_in_short_batches(tmp_path: Path) -> None:
    """On the CPU a 384 px model is given short batches whatever the engine's batch size
    (longer ones only ran slower there): ConvNeXt one image at a time, others two; a 224 px
    one, or any model on a GPU, gets the engine's."""
    from workers.detectors.torch_models.runtime import cpu_batch_limit
    from workers.engine import batch_limit, detector_batcher

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert cpu_batch_limit("convnext_large", (3, 384, 384), cpu) == 1
    assert cpu_batch_limit(COMMFOR_VIT_384, (3, 384, 384), cpu) == 2
    assert cpu_batch_limit(COMMFOR_VIT_224, (3, 224, 224), cpu) is None
    assert cpu_batch_limit("convnext_large", (3, 384, 384), cuda) is None

    write_sumsub_raw(tmp_path / "convnext.pt", CONVNEXT_STAND_IN)
    write_sumsub_raw(tmp_path / "mobilenet.pt", SUMSUB_MOBILENET)
    large = load_sumsub(
        spec("sumsub", backbone=CONVNEXT_STAND_IN, **CONVNEXT_L_PREPROCESSING),
        device="cpu",
        weights_path=tmp_path / "convnext.pt",
    )
    small = load_sumsub(
        spec("sumsub", backbone=SUMSUB_MOBILENET),
        device="cpu",
        weights_path=tmp_path / "mobilenet.pt",
    )
    assert [batch_limit(large, n) for n in (1, 2, 16)] == [1, 1, 1]
    assert batch_limit(small, 16) == 16
    batcher = detector_batcher(large, max_batch=16, max_wait_s=0.1)
    try:
        assert batcher.max_batch == 1
    finally:
        batcher.close()


def test_models_on_the_cpu_run_as_frozen_graphs(
    corpus_images: list[CorpusImage], tmp_path: Path
) -> None:
    """A torch model on the CPU runs as a frozen TorchScript graph unless its option says
    otherwise, with the eager module's scores."""
    write_sumsub_raw(tmp_path / "mobilenet.pt", SUMSUB_MOBILENET)

    weights = tmp_path / "mobilenet.pt"
    graph, eager = mobilenet(weights), mobilenet(weights, frozen_graph=False)
    assert graph.frozen_graph and not eager.frozen_graph
    images = corpus_images[:6]
    for got, want in zip(
        detector_scores(graph, images), detector_scores(eager, images), strict=True
    ):
        assert abs(got - want) <= TOLERANCE, (got, want)


def test_autocast_runs_the_model_in_reduced_precision_on_the_cpu(
    corpus_images: list[CorpusImage], tmp_path: Path
) -> None:
    """``autocast`` is honoured on the CPU as on a GPU (frozen graph or eager): the scores
    move, a little, and stay finite; without it they are float32's."""
    weights = tmp_path / "mobilenet.pt"
    write_sumsub_raw(weights, SUMSUB_MOBILENET)

    images = corpus_images[:6]
    exact = detector_scores(mobilenet(weights), images)
    for options in ({"autocast": "bf16"}, {"autocast": "bf16", "frozen_graph": False}):
        detector = mobilenet(weights, **options)
        assert detector.frozen_graph is options.get("frozen_graph", True)
        reduced = detector_scores(detector, images)
        deltas = [abs(a - b) for a, b in zip(exact, reduced, strict=True)]
        # bfloat16 keeps 8 bits of mantissa: the scores are not float32's (float32 paths
        # agree within 1e-7 here; bf16 moved these by 2e-4 to 3e-3), but close to them.
        assert max(deltas) > 5 * TOLERANCE, (options, deltas)
        assert max(deltas) < 0.05, (options, deltas)


def test_an_autocast_torch_cannot_run_is_refused() -> None:
    """torch warns and runs float32 where it cannot autocast to a dtype: the detector is
    refused instead, so that no float32 score is stored under an autocast version."""
    with pytest.raises(DetectorUnavailable, match=r"autocast to torch\.float64 is not supported"):
        check_autocast(spec("sumsub"), torch.device("cpu"), torch.float64)
    check_autocast(spec("sumsub"), torch.device("cpu"), torch.bfloat16)  # supported: no error


class _SizeBaked(torch.nn.Module):
    """A model whose trace bakes in the batch size it was traced with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 2.0 if int(x.shape[0]) == 2 else 3.0
        return x.flatten(1)[:, :2] * scale


class _Untraceable(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("not here")


def test_a_graph_that_disagrees_with_its_model_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from workers.detectors.torch_models.runtime import freeze_graph

    size, cpu = (3, 4, 4), torch.device("cpu")
    caplog.set_level("WARNING")
    baked = _SizeBaked().eval()
    assert freeze_graph(baked, size, cpu, channels_last=False, name="b") is baked
    failing = _Untraceable().eval()
    assert freeze_graph(failing, size, cpu, channels_last=False, name="u") is failing
    messages = [record.getMessage() for record in caplog.records]
    assert "model kept in eager mode: its traced graph disagrees with it" in messages
    assert "model kept in eager mode: it cannot be traced" in messages
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2)).eval()
    frozen = freeze_graph(linear, size, cpu, channels_last=False, name="l")
    assert isinstance(frozen, torch.jit.ScriptModule)
    x = torch.rand(5, *size)
    with torch.inference_mode():
        assert torch.allclose(frozen(x), linear(x), atol=1e-6)


def test_sumsub_evidence_and_ai_index(corpus_images: list[CorpusImage], tmp_path: Path) -> None:
    state = write_sumsub_raw(tmp_path / "synthetic.pt", CONVNEXT_STAND_IN)
    options = {"backbone": CONVNEXT_STAND_IN, "input_size": 96}
    images = corpus_images[:2]
    default = load_sumsub(spec("sumsub", **options), device="cpu", weights_path=tmp_path)
    flipped = load_sumsub(
        spec("sumsub", **options, ai_index=0), device="cpu", weights_path=tmp_path
    )
    decoded = [image.as_decoded() for image in images]
    for one, other in zip(
        default.detect_batch(decoded, []), flipped.detect_batch(decoded, []), strict=True
    ):
        assert one.score is not None and other.score is not None
        assert one.evidence["ai_index"] == 1 and other.evidence["ai_index"] == 0
        assert one.evidence["p_ai"] == one.score
        labels = one.evidence["label_scores"]
        assert labels["by AI"] == one.score
        assert abs(labels["by AI"] + labels["by human"] - 1.0) < 1e-6
        assert abs(other.score - labels["by human"]) < 1e-6
    # The class index is part of what was configured, so it is part of the version.
    assert default.version != flipped.version
    assert state  # written through the published format above


def test_real_convnext_large_structure_matches_the_sumsub_family() -> None:
    """ConvNeXt-L (200M parameters) built on the meta device: the keys and shapes the family
    expects are the ones a module built as the card describes would save."""
    with torch.device("meta"):
        ours = sumsub_module(SUMSUB_CONVNEXT).state_dict()
        card = SumsubReference(SUMSUB_CONVNEXT).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in card.items()
    }
    assert tuple(ours["clf.0.weight"].shape) == (128, 1536)
    assert tuple(ours["clf.2.weight"].shape) == (2, 128)
    assert tuple(ours["model.stem.0.weight"].shape) == (192, 3, 4, 4)
    assert tuple(ours["model.head.pre_logits.fc.weight"].shape) == (1536, 1536)
    assert {key.split(".", 1)[0] for key in ours} == {"model", "clf"}


def test_real_mobilenet_pooled_width_is_1280() -> None:
    """timm >= 1.0 reports num_features=960 for MobileNetV3-L; the pooled output (and the
    published clf.0) is 1280 wide."""
    with torch.device("meta"):
        ours = sumsub_module(SUMSUB_MOBILENET).state_dict()
    assert tuple(ours["clf.0.weight"].shape) == (128, 1280)


def test_backbone_tags_resolve_to_the_published_preprocessing() -> None:
    convnext = timm_data_config(SUMSUB_CONVNEXT, SumsubOptions(backbone=SUMSUB_CONVNEXT))
    assert convnext["input_size"] == (3, 384, 384)
    assert convnext["interpolation"] == "bicubic"
    assert convnext["crop_pct"] == 1.0
    assert convnext["crop_mode"] == "squash"
    assert tuple(convnext["mean"]) == CLIP_MEAN
    assert tuple(convnext["std"]) == CLIP_STD

    mobilenet = timm_data_config(SUMSUB_MOBILENET, SumsubOptions(backbone=SUMSUB_MOBILENET))
    assert mobilenet["input_size"] == (3, 224, 224)
    assert mobilenet["interpolation"] == "bilinear"
    assert mobilenet["crop_pct"] == 0.875
    assert mobilenet["crop_mode"] == "center"
    assert tuple(mobilenet["mean"]) == (0.5, 0.5, 0.5)

    overridden = timm_data_config(
        SUMSUB_MOBILENET,
        SumsubOptions.model_validate(
            {"backbone": SUMSUB_MOBILENET, "input_size": 256, "crop_pct": 1.0}
        ),
    )
    assert overridden["input_size"] == (3, 256, 256)
    assert overridden["crop_pct"] == 1.0
    assert overridden["interpolation"] == "bilinear"


# --------------------------------------------------------------------------------------------
# Community Forensics
# --------------------------------------------------------------------------------------------


def test_commfor_384_hub_folder_matches_the_authors_pipeline(
    corpus_images: list[CorpusImage], tmp_path: Path
) -> None:
    """Hub layout (config.json + model.safetensors), real ViT-S/16 at 384: Resize(440) ->
    CenterCrop(384) -> ImageNet statistics."""
    folder = tmp_path / "commfor-model-384"
    state = write_commfor_hub_folder(folder, COMMFOR_VIT_384)
    detector = load_commfor(
        spec("commfor", backbone=COMMFOR_VIT_384), device="cpu", weights_path=folder
    )
    scorer = CommForReferenceScorer(state, COMMFOR_VIT_384)
    reference = scorer.scores(commfor_eval(440, 384), corpus_images)
    # Near miss: the older branch's CLIP mean.
    wrong = scorer.scores(commfor_eval(440, 384, mean=CLIP_MEAN), corpus_images[:2])
    assert_faithful(detector, corpus_images, reference, wrong)
    output = detector.detect_batch([corpus_images[0].as_decoded()], [])[0]
    assert output.evidence["p_ai"] == output.score
    assert isinstance(output.evidence["logit"], float)


def test_commfor_224_training_checkpoint_matches_the_authors_pipeline(
    corpus_images: list[CorpusImage], tmp_path: Path
) -> None:
    """``{"model": ...}`` with ``_orig_mod.`` keys, ViT-S/16 at 224: Resize(256) ->
    CenterCrop(224)."""
    state = write_commfor_training_checkpoint(tmp_path / "ckpt.pt", COMMFOR_VIT_224)
    detector = load_commfor(
        spec("commfor", backbone=COMMFOR_VIT_224), device="cpu", weights_path=tmp_path / "ckpt.pt"
    )
    scorer = CommForReferenceScorer(state, COMMFOR_VIT_224)
    reference = scorer.scores(commfor_eval(256, 224), corpus_images)
    # Near miss: resize straight to the crop size.
    wrong = scorer.scores(commfor_eval(224, 224), corpus_images[:2])
    assert_faithful(detector, corpus_images, reference, wrong)


def test_commfor_structure_matches_the_authors_model_class() -> None:
    for backbone in (COMMFOR_VIT_384, COMMFOR_VIT_224):
        with torch.device("meta"):
            ours = commfor_module(backbone).state_dict()
            authors = CommForReference(backbone).state_dict()
        assert {k: tuple(v.shape) for k, v in ours.items()} == {
            k: tuple(v.shape) for k, v in authors.items()
        }
        assert tuple(ours["vit.head.weight"].shape) == (1, 384)


def test_commfor_config_json_contradicting_the_backbone_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "commfor-model-224"
    write_commfor_hub_folder(folder, COMMFOR_VIT_224)
    with pytest.raises(CheckpointFormatError) as caught:
        load_commfor(spec("commfor", backbone=COMMFOR_VIT_384), device="cpu", weights_path=folder)
    assert "vit_small_patch16_224" in str(caught.value)
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------------------------
# Generic timm family
# --------------------------------------------------------------------------------------------


def test_timm_family_plain_classifier_matches_reference(
    corpus_images: list[CorpusImage], tmp_path: Path
) -> None:
    """A timm classifier whose keys are timm's own, one sigmoid logit, explicit
    preprocessing."""
    torch.manual_seed(3)
    net = timm.create_model("test_efficientnet", pretrained=False, num_classes=1)
    with torch.no_grad():
        net.classifier.weight.mul_(25.0)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / "classifier.pth")
    options = {
        "architecture": "test_efficientnet",
        "num_classes": 1,
        "preprocessing": "explicit",
        "resize": 160,
        "crop": 144,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "interpolation": "bicubic",
    }
    detector = load_timm(
        spec("timm", **options), device="cpu", weights_path=tmp_path / "classifier.pth"
    )

    def reference(preprocess: Preprocess) -> list[float]:
        net.eval()
        with torch.no_grad():
            return [
                float(torch.sigmoid(net(preprocess(image.as_authors_read_it()).unsqueeze(0)))[0, 0])
                for image in corpus_images
            ]

    good = T.Compose(
        [
            T.Resize(160, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(144),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    # Near miss: resize straight to the crop size.
    no_margin = T.Compose(
        [T.Resize(144, interpolation=T.InterpolationMode.BICUBIC), *good.transforms[1:]]
    )
    assert_faithful(detector, corpus_images, reference(good), reference(no_margin)[:2])


def test_timm_family_with_sumsub_head_loads_sumsub_weights(
    corpus_images: list[CorpusImage], tmp_path: Path
) -> None:
    state = write_sumsub_raw(tmp_path / "synthetic.pt", CONVNEXT_STAND_IN)
    detector = load_timm(
        spec(
            "timm",
            architecture=CONVNEXT_STAND_IN,
            head="sumsub",
            **CONVNEXT_L_PREPROCESSING,
        ),
        device="cpu",
        weights_path=tmp_path / "synthetic.pt",
    )
    reference = SumsubReferenceScorer(state, CONVNEXT_STAND_IN).scores(
        clip_squash_384(), corpus_images
    )
    got = detector_scores(detector, corpus_images)
    assert max(abs(a - b) for a, b in zip(got, reference, strict=True)) <= TOLERANCE


# --------------------------------------------------------------------------------------------
# Loading: identity, pins, mismatches
# --------------------------------------------------------------------------------------------


def test_loaded_detector_names_its_weights_and_version(tmp_path: Path) -> None:
    write_sumsub_raw(tmp_path / "synthetic.pt", CONVNEXT_STAND_IN)
    digest = sha256_file(tmp_path / "synthetic.pt")
    pinned = DetectorSpec(
        "sumsub-test",
        "sumsub",
        "2.0",
        weights="hf://Sumsub/Sumsub-ffs-synthetic-2.0/synthetic.pt",
        sha256=digest,
        options={"backbone": CONVNEXT_STAND_IN},
    )
    detector = load_sumsub(pinned, device="cpu", weights_path=tmp_path / "synthetic.pt")
    assert isinstance(detector, Detector)
    assert detector.weights_sha256 == digest
    assert detector.version == derive_version(pinned, digest)
    assert detector.detect_batch([], []) == []


def test_pinned_sha256_mismatch_is_refused_before_loading(tmp_path: Path) -> None:
    write_sumsub_raw(tmp_path / "synthetic.pt", CONVNEXT_STAND_IN)
    pinned = DetectorSpec(
        "sumsub-test", "sumsub", "1", sha256="ab" * 32, options={"backbone": CONVNEXT_STAND_IN}
    )
    with pytest.raises(WeightsIntegrityError):
        load_sumsub(pinned, device="cpu", weights_path=tmp_path / "synthetic.pt")


def test_checkpoint_for_another_backbone_names_the_mismatched_keys(tmp_path: Path) -> None:
    write_commfor_training_checkpoint(tmp_path / "ckpt.pt", COMMFOR_VIT_224)
    with pytest.raises(CheckpointFormatError) as caught:
        load_sumsub(
            spec("sumsub", backbone=CONVNEXT_STAND_IN),
            device="cpu",
            weights_path=tmp_path / "ckpt.pt",
        )
    message = str(caught.value)
    assert "\n" not in message
    assert "missing keys (model.stem.0.weight" in message
    assert "unexpected keys (vit." in message

    state = write_sumsub_raw(tmp_path / "synthetic.pt", CONVNEXT_STAND_IN)
    state["clf.0.weight"] = state["clf.0.weight"][:, :32]  # a head for a narrower backbone
    torch.save(state, tmp_path / "narrow.pt")
    with pytest.raises(CheckpointFormatError) as caught:
        load_sumsub(
            spec("sumsub", backbone=CONVNEXT_STAND_IN),
            device="cpu",
            weights_path=tmp_path / "narrow.pt",
        )
    assert str(caught.value).endswith(
        "1 shape mismatches, checkpoint vs model (clf.0.weight (128, 32) vs (128, 64))"
    )


@pytest.mark.parametrize(
    ("family", "options", "fragment"),
    [
        ("sumsub", {}, "needs option backbone"),
        ("sumsub", {"backbone": CONVNEXT_STAND_IN, "ai_index": 2}, "ai_index"),
        ("sumsub", {"backbone": CONVNEXT_STAND_IN, "crop_mode": "zoom"}, "crop_mode"),
        ("sumsub", {"backbone": CONVNEXT_STAND_IN, "autocast": "fp8"}, "autocast"),
        ("sumsub", {"backbone": "no_such_net"}, "cannot build"),
        ("timm", {"architecture": CONVNEXT_STAND_IN, "head": "mlp"}, "head"),
        (
            "timm",
            {"architecture": CONVNEXT_STAND_IN, "num_classes": 1, "activation": "softmax"},
            "softmax",
        ),
        (
            "timm",
            {"architecture": CONVNEXT_STAND_IN, "preprocessing": "explicit", "crop": 9},
            "mean and std",
        ),
        (
            "timm",
            {
                "architecture": "no_such_net",
                "preprocessing": "explicit",
                "resize": 10,
                "crop": 9,
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
            },
            "cannot build",
        ),
        ("commfor", {"backbone": "no_such_net"}, "option crop is required"),
        (
            "sumsub",
            {"backbone": CONVNEXT_STAND_IN, "ai_indx": 0},
            r"unknown sumsub options \['ai_indx'\]",
        ),
    ],
)
def test_invalid_options_are_clear_and_skippable(
    tmp_path: Path, family: str, options: dict[str, object], fragment: str
) -> None:
    write_sumsub_raw(tmp_path / "synthetic.pt", CONVNEXT_STAND_IN)
    loader = {"sumsub": load_sumsub, "commfor": load_commfor, "timm": load_timm}[family]
    with pytest.raises(DetectorOptionsError, match=fragment) as caught:
        loader(spec(family, **options), device="cpu", weights_path=tmp_path / "synthetic.pt")
    # Skippable: a fleet leaves this one detector out, with a message naming it.
    assert isinstance(caught.value, DetectorUnavailable)
    assert str(caught.value).startswith(f"detector test-{family} (family {family}): ")
