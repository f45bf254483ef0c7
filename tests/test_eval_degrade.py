"""GenImage's degradations against their definitions: Pillow's own resize and JPEG encoder,
scipy's Gaussian filter, and the properties each condition must have."""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, JpegImagePlugin
from scipy import ndimage

from workers.evaluation import degrade
from workers.intake import Rejected


def _pattern(height: int = 160, width: int = 224, seed: int = 7) -> Image.Image:
    """Edges, smooth ramps and fine texture: something every degradation changes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    checks = ((x // 16 + y // 16) % 2) * 160.0 + 40.0
    ramp = 255.0 * x / (width - 1)
    waves = 127.5 + 100.0 * np.sin(x / 3.0) * np.cos(y / 5.0)
    noise = rng.normal(0.0, 6.0, (height, width))
    pixels = np.stack([checks + noise, ramp, waves], axis=-1)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _pixels(image: Image.Image) -> npt.NDArray[np.float64]:
    return np.asarray(image, dtype=np.float64)


def _psnr(a: Image.Image, b: Image.Image) -> float:
    mse = float(np.mean((_pixels(a) - _pixels(b)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def test_the_conditions_and_their_stable_names() -> None:
    assert list(degrade.CONDITIONS) == [
        "identity",
        "downscale_112",
        "downscale_64",
        "jpeg_65",
        "jpeg_30",
        "blur_3",
        "blur_5",
    ]
    assert degrade.get_condition("jpeg_30").value == 30
    assert degrade.get_condition("blur_5").kind is degrade.Kind.BLUR
    assert degrade.CONDITIONS["downscale_64"].as_dict()["value"] == 64
    with pytest.raises(ValueError, match=r"unknown degradation 'jpeg_50'.*identity"):
        degrade.get_condition("jpeg_50")


def test_identity_is_lossless_and_keeps_the_file_as_it_came() -> None:
    image = _pattern()
    same = degrade.apply("identity", image)
    assert same is not image
    assert np.array_equal(_pixels(same), _pixels(image))
    data = _png(image)
    assert degrade.degraded_bytes("identity", data) == data


@pytest.mark.parametrize(("name", "side"), [("downscale_112", 112), ("downscale_64", 64)])
@pytest.mark.parametrize("size", [(300, 200), (200, 300), (64, 64), (50, 80)])
def test_downscale_gives_exactly_n_by_n_bicubic(
    name: str, side: int, size: tuple[int, int]
) -> None:
    image = _pattern(height=size[1], width=size[0])
    out = degrade.apply(name, image)
    assert out.mode == "RGB"
    assert out.size == (side, side)
    direct = image.resize((side, side), Image.Resampling.BICUBIC)
    assert np.array_equal(_pixels(out), _pixels(direct))


def test_downscale_filters_rather_than_samples() -> None:
    """A one-pixel checkerboard shrunk 4x: an antialiased filter averages it to grey,
    taking every 4th pixel would keep it black or white."""
    board = ((np.indices((448, 448)).sum(axis=0) % 2) * 255).astype(np.uint8)
    image = Image.fromarray(np.stack([board] * 3, axis=-1), "RGB")
    out = _pixels(degrade.apply("downscale_112", image))
    assert abs(out.mean() - 127.5) < 2.0
    assert out.std() < 3.0
    sampled = _pixels(image.resize((112, 112), Image.Resampling.NEAREST))
    assert abs(sampled.mean() - 127.5) > 100.0


@pytest.mark.parametrize(("name", "quality"), [("jpeg_65", 65), ("jpeg_30", 30)])
def test_jpeg_is_one_pillow_encoding_at_that_quality(name: str, quality: int) -> None:
    image = _pattern()
    direct = io.BytesIO()
    image.save(direct, format="JPEG", quality=quality)
    produced = degrade.degraded_bytes(name, _png(image))
    assert produced == direct.getvalue()
    with Image.open(io.BytesIO(produced)) as jpeg:
        assert jpeg.format == "JPEG"
        assert JpegImagePlugin.get_sampling(jpeg) == 2  # 4:2:0
    assert np.array_equal(_pixels(degrade.apply(name, image)), _pixels(_decode(produced)))


def test_lower_jpeg_quality_loses_more() -> None:
    """On a grey image: 4:2:0 subsampling takes the same colour detail at both qualities,
    which would hide part of the difference the quality makes."""
    image = _pattern().convert("L").convert("RGB")
    q65 = _psnr(image, degrade.apply("jpeg_65", image))
    q30 = _psnr(image, degrade.apply("jpeg_30", image))
    assert 25.0 < q30 < q65 < 60.0
    assert q65 - q30 > 1.0


@pytest.mark.parametrize(("name", "sigma"), [("blur_3", 3.0), ("blur_5", 5.0)])
def test_blur_is_a_gaussian_of_that_standard_deviation(name: str, sigma: float) -> None:
    """Pillow approximates the Gaussian with three box passes, so it is compared with
    scipy's exact filter away from the border (4 sigma), where the two edge treatments
    differ: within 4 grey levels at every pixel and 1 on average, and closer to sigma
    than to 20 % less or more."""
    image = _pattern()
    source = _pixels(image)
    out = _pixels(degrade.apply(name, image))
    margin = int(4 * sigma)
    inner = (slice(margin, -margin), slice(margin, -margin))

    def error(s: float) -> npt.NDArray[np.float64]:
        expected = np.stack(
            [ndimage.gaussian_filter(source[..., c], s, mode="nearest") for c in range(3)],
            axis=-1,
        )
        diff: npt.NDArray[np.float64] = np.abs(out - expected)[inner]
        return diff

    at_sigma = error(sigma)
    assert at_sigma.max() <= 4.0
    assert at_sigma.mean() <= 1.0
    assert at_sigma.mean() < error(0.8 * sigma).mean()
    assert at_sigma.mean() < error(1.2 * sigma).mean()


def _sharpness(image: Image.Image) -> float:
    grey = _pixels(image.convert("L"))
    return float(ndimage.laplace(grey).var())


def test_a_larger_sigma_blurs_more() -> None:
    image = _pattern()
    original = _sharpness(image)
    sigma3 = _sharpness(degrade.apply("blur_3", image))
    sigma5 = _sharpness(degrade.apply("blur_5", image))
    assert sigma5 < sigma3 < original / 10


@pytest.mark.parametrize("name", ["downscale_112", "downscale_64", "blur_3", "blur_5"])
def test_lossless_conditions_are_png_of_exactly_the_degraded_pixels(name: str) -> None:
    image = _pattern()
    produced = degrade.degraded_bytes(name, _png(image))
    assert produced.startswith(b"\x89PNG\r\n\x1a\n")
    assert np.array_equal(_pixels(_decode(produced)), _pixels(degrade.apply(name, image)))


def test_degraded_bytes_decodes_as_intake_does() -> None:
    """A JPEG stored sideways with an EXIF orientation is degraded upright, as the
    detectors see it; a palette PNG is converted to RGB first."""
    image = _pattern(height=40, width=80)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    stored = io.BytesIO()
    image.save(stored, format="JPEG", quality=95, exif=exif)
    out = _decode(degrade.degraded_bytes("blur_3", stored.getvalue()))
    assert out.size == (40, 80)

    palette = image.convert("P")
    out = _decode(degrade.degraded_bytes("jpeg_65", _png(palette)))
    assert out.mode == "RGB"
    assert out.size == (80, 40)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="RGB"):
        degrade.apply("blur_3", _pattern().convert("L"))
    with pytest.raises(Rejected):
        degrade.degraded_bytes("jpeg_30", b"not an image at all")
