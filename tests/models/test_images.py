"""models.images.load_image on a corpus of odd files made here: each loads as 8-bit RGB that
Preprocess accepts, or raises a one-line ImageError."""

from __future__ import annotations

import io
import os
import random
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, features

from models import Preprocess
from models.images import DECODERS, DEFAULT_MAX_PIXELS, image_name
from tests.conftest import ROOT
from viz import ImageError, load_image

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255,) * 3, (0,) * 3
HANG_GUARD_S = 5.0  # only catches hangs; not a performance claim


def encode(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def halves(mode: str, left, right, size=(32, 16)) -> Image.Image:
    """An image whose left half is `left` and right half is `right`."""
    im = Image.new(mode, size, left)
    im.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return im


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels but whose data is a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def noise(size=(64, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def animated(fmt: str, **params) -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, GREEN, BLUE)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, **params)


def palette_with_transparency(fmt: str) -> bytes:
    im = Image.new("P", (32, 16), 0)
    im.putpalette([*RED, *BLUE] + [0] * (3 * 254))
    im.paste(1, (16, 0, 32, 16))
    return encode(im, fmt, transparency=0)


def exif_rotated_jpeg() -> bytes:
    """40 x 20 stored, orientation 6 (display rotated 90 degrees clockwise), red top-left block."""
    im = Image.new("RGB", (40, 20), WHITE)
    im.paste(RED, (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(im, "JPEG", quality=95, exif=exif.tobytes())


def grey16_png() -> bytes:
    a = np.full((16, 32), 10000, np.uint16)
    a[:, 16:] = 50000
    return encode(Image.fromarray(a), "PNG")


def float_tiff(left: float, right: float) -> bytes:
    a = np.full((16, 32), left, np.float32)
    a[:, 16:] = right
    return encode(Image.fromarray(a), "TIFF")


def int32_tiff() -> bytes:
    a = np.full((16, 32), 100_000, np.int32)
    a[:, 16:] = 400_000
    return encode(Image.fromarray(a), "TIFF")


def multipage_tiff() -> bytes:
    return encode(
        Image.new("RGB", (32, 16), RED),
        "TIFF",
        save_all=True,
        append_images=[Image.new("RGB", (16, 32), GREEN)],
    )


def truncated(fmt: str) -> bytes:
    data = encode(noise(), fmt)
    return data[: len(data) // 2]


HEIC_HEADER = struct.pack(">I", 24) + b"ftypheic" + b"\0\0\0\0" + b"mif1heic" + bytes(64)
SVG = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
    b'<rect width="10" height="10" fill="red"/></svg>\n'
)
PDF = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"

# name -> (make the bytes, None if it must load, else a word its ImageError must contain)
CASES: dict[str, tuple[Callable[[], bytes], str | None]] = {
    "empty": (lambda: b"", "empty"),
    "random_bytes": (lambda: random.Random(0).randbytes(4096), "not a recognised image"),
    "text": (lambda: b"Just some notes, not a picture.\nSecond line.\n", "text"),
    "svg": (lambda: SVG, "SVG"),
    "pdf": (lambda: PDF, "PDF"),
    "heic_header": (lambda: HEIC_HEADER, "HEIC"),
    "bomb_above_limit": (lambda: png_declaring(8000, 8000), "too large"),
    "bomb_pil_warning": (lambda: png_declaring(10_000, 10_000), "too large"),
    "bomb_pil_error": (lambda: png_declaring(100_000, 100_000), "too large"),
    "png_zero_width": (lambda: png_declaring(0, 16), "PNG header is corrupt"),
    "truncated_jpeg": (lambda: truncated("JPEG"), "truncated"),
    "truncated_png": (lambda: truncated("PNG"), "truncated"),
    "jpeg_header_only": (lambda: encode(noise(), "JPEG")[:200], "truncated"),
    "gif_header_only": (lambda: b"GIF89a\x10\x00", "GIF header is corrupt"),
    "webp_garbage": (lambda: b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(8), "WEBP"),
    "mp4_header": (lambda: struct.pack(">I", 24) + b"ftypisom" + bytes(80), "ISO media"),
    "png_grey16": (grey16_png, None),
    "tiff_float_unit": (lambda: float_tiff(0.2, 0.8), None),
    "tiff_float_wide": (lambda: float_tiff(250.0, 1000.0), None),
    "tiff_float_negative_nan": (lambda: float_tiff(-1.0, float("nan")), None),
    "tiff_int32": (int32_tiff, None),
    "jpeg_cmyk": (lambda: encode(Image.new("CMYK", (32, 16), (255, 0, 0, 0)), "JPEG"), None),
    "png_palette_transparent": (lambda: palette_with_transparency("PNG"), None),
    "gif_palette_transparent": (lambda: palette_with_transparency("GIF"), None),
    "png_rgb_trns": (lambda: encode(halves("RGB", RED, BLUE), "PNG", transparency=RED), None),
    "png_rgba": (lambda: encode(halves("RGBA", (255, 0, 0, 0), (0, 0, 0, 255)), "PNG"), None),
    "png_la": (lambda: encode(halves("LA", (0, 0), (0, 255)), "PNG"), None),
    "png_bilevel": (lambda: encode(halves("1", 0, 1), "PNG"), None),
    "bmp_bilevel": (lambda: encode(halves("1", 0, 1), "BMP"), None),
    "jpeg_grey": (lambda: encode(halves("L", 0, 255), "JPEG"), None),
    "gif_animated": (lambda: animated("GIF"), None),
    "webp_animated": (lambda: animated("WEBP", lossless=True), None),
    "png_animated": (lambda: animated("PNG"), None),
    "tiff_multipage": (multipage_tiff, None),
    "webp": (lambda: encode(noise(), "WEBP"), None),
    "bmp": (lambda: encode(noise(), "BMP"), None),
    "ico": (lambda: encode(noise((32, 32)), "ICO"), "not a recognised image format"),
    "ppm": (lambda: encode(noise(), "PPM"), "not a recognised image format"),
    "jpeg_progressive": (lambda: encode(noise(), "JPEG", progressive=True), None),
    "pixel_1x1": (lambda: encode(Image.new("RGB", (1, 1), GREEN), "PNG"), None),
    "sliver_4000x8": (lambda: encode(Image.new("RGB", (4000, 8), BLUE), "PNG"), None),
    "jpeg_exif_rotated": (exif_rotated_jpeg, None),
    "jpeg_broken_exif": (
        lambda: encode(noise(), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff"),
        None,
    ),
}
if features.check("avif"):
    CASES["avif"] = (lambda: encode(noise(), "AVIF"), "ISO media file")


def timed_load(source, **kwargs) -> Image.Image:
    start = time.perf_counter()
    try:
        return load_image(source, **kwargs)
    finally:
        assert time.perf_counter() - start < HANG_GUARD_S


def assert_one_line(error: ImageError) -> None:
    text = str(error)
    assert text and "\n" not in text and "\r" not in text


def px(im: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return im.getpixel((x, y))


def near(a, b, tol: int = 3) -> bool:
    return all(abs(int(u) - int(v)) <= tol for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("case", list(CASES))
def test_corpus_loads_as_rgb_or_refuses_in_one_line(case):
    make, refusal = CASES[case]
    data = make()
    if refusal is not None:
        with pytest.raises(ImageError) as info:
            timed_load(data)
        assert_one_line(info.value)
        assert refusal in str(info.value)
        return
    image = timed_load(data)
    assert image.mode == "RGB" and np.asarray(image).dtype == np.uint8
    assert getattr(image, "fp", None) is None
    start = time.perf_counter()
    x = Preprocess()(image)
    assert time.perf_counter() - start < HANG_GUARD_S
    assert x.shape == (1, 3, 224, 224) and torch.isfinite(x).all()


def test_sixteen_bit_grey_keeps_levels_on_the_full_scale():
    im = load_image(grey16_png())
    left, right = px(im, 0, 0), px(im, 31, 0)
    assert near(left, (round(10000 / 257),) * 3) and near(right, (round(50000 / 257),) * 3)
    assert right[0] > left[0] > 0 and right[0] < 255


def test_float_images_keep_relative_levels():
    unit = load_image(float_tiff(0.2, 0.8))  # within [0, 1]: absolute
    assert near(px(unit, 0, 0), (51,) * 3) and near(px(unit, 31, 0), (204,) * 3)
    wide = load_image(float_tiff(250.0, 1000.0))  # by its own maximum
    assert near(px(wide, 0, 0), (64,) * 3) and near(px(wide, 31, 0), WHITE)
    signed = load_image(float_tiff(-1.0, 3.0))  # minimum to maximum
    assert near(px(signed, 0, 0), BLACK) and near(px(signed, 31, 0), WHITE)
    ints = load_image(int32_tiff())
    assert near(px(ints, 0, 0), (64,) * 3) and near(px(ints, 31, 0), WHITE)


def test_transparency_is_composited_over_white():
    for data in (palette_with_transparency("PNG"), palette_with_transparency("GIF")):
        im = load_image(data)
        assert near(px(im, 0, 0), WHITE) and near(px(im, 31, 0), BLUE)
    im = load_image(encode(halves("RGB", RED, BLUE), "PNG", transparency=RED))
    assert near(px(im, 0, 0), WHITE) and near(px(im, 31, 0), BLUE)
    im = load_image(encode(halves("RGBA", (255, 0, 0, 0), (0, 0, 0, 255)), "PNG"))
    assert near(px(im, 0, 0), WHITE) and near(px(im, 31, 0), BLACK)
    im = load_image(encode(Image.new("RGBA", (4, 4), (255, 0, 0, 128)), "PNG"))
    assert near(px(im, 0, 0), (255, 127, 127), tol=2)
    im = load_image(encode(halves("LA", (0, 0), (0, 255)), "PNG"))
    assert near(px(im, 0, 0), WHITE) and near(px(im, 31, 0), BLACK)


def test_other_modes_convert_to_the_right_colours():
    im = load_image(encode(Image.new("CMYK", (32, 16), (255, 0, 0, 0)), "JPEG"))
    assert near(px(im, 16, 8), (0, 255, 255), tol=12)
    im = load_image(encode(halves("1", 0, 1), "PNG"))
    assert px(im, 0, 0) == BLACK and px(im, 31, 0) == WHITE


def test_first_frame_of_animations_and_multipage_tiff():
    for data in (animated("GIF"), animated("WEBP", lossless=True), animated("PNG")):
        assert near(px(load_image(data), 8, 8), RED)
    im = load_image(multipage_tiff())
    assert im.size == (32, 16) and px(im, 0, 0) == RED


def test_exif_orientation_is_applied():
    im = load_image(exif_rotated_jpeg())
    assert im.size == (20, 40)  # stored 40 x 20, displayed turned a quarter clockwise
    assert near(px(im, 17, 2), RED, tol=40)  # stored top-left now at the top-right
    assert near(px(im, 2, 2), WHITE, tol=40) and near(px(im, 17, 37), WHITE, tol=40)


def test_size_is_checked_on_the_header_before_decoding():
    # The data is a few bytes: decoding would fail differently, so the size check came first.
    with pytest.raises(ImageError, match=r"8000 x 8000 = 64\.0 megapixels") as info:
        timed_load(png_declaring(8000, 8000))
    assert_one_line(info.value)
    assert DEFAULT_MAX_PIXELS == 40_000_000
    small = encode(noise((100, 100)), "PNG")
    with pytest.raises(ImageError, match="too large"):
        load_image(small, max_pixels=5000)
    assert load_image(small, max_pixels=10_000).size == (100, 100)
    assert load_image(small, max_pixels=None).size == (100, 100)
    with pytest.raises(ValueError):
        load_image(small, max_pixels=0)


def test_truncated_files_stay_refused_without_global_switch():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    for fmt in ("JPEG", "PNG"):
        with pytest.raises(ImageError, match="truncated"):
            load_image(truncated(fmt))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


class Unseekable(io.RawIOBase):
    """A read-only stream that cannot seek, like a pipe."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self._data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def test_sources_path_bytes_and_file_objects(tmp_path: Path):
    data = encode(halves("RGB", RED, BLUE), "PNG")
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    with open(path, "rb") as handle:
        handle.read(5)  # the position does not matter
        from_handle = load_image(handle)
        assert not handle.closed  # the caller owns it
    sources = [
        str(path),
        path,
        data,
        bytearray(data),
        memoryview(data),
        io.BytesIO(data),
        Unseekable(data),
    ]
    for image in [from_handle, *(load_image(s) for s in sources)]:
        assert image.size == (32, 16) and px(image, 0, 0) == RED and px(image, 31, 0) == BLUE


def test_source_errors(tmp_path: Path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageError, match=r"'missing\.png'.*no such file") as info:
        load_image(missing)
    assert_one_line(info.value)
    with pytest.raises(ImageError) as info:
        load_image(str(tmp_path / "two\nlines.png"))
    assert_one_line(info.value)
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    (tmp_path / "notes.txt").write_text("hello\n")
    with open(tmp_path / "notes.txt") as text_handle, pytest.raises(ImageError, match="binary"):
        load_image(text_handle)
    named = io.BytesIO(b"")
    named.name = "upload.heic"
    with pytest.raises(ImageError, match=r"'upload\.heic': the file is empty"):
        load_image(named)
    with pytest.raises(TypeError):
        load_image(42)  # type: ignore[arg-type]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count open files")
def test_no_file_handle_left_open(tmp_path: Path):
    paths = []
    for name in ("picture.png", "animated.gif", "pages.tiff", "cut.jpg", "notes.svg"):
        paths.append(tmp_path / name)
    datas = [encode(noise(), "PNG"), animated("GIF"), multipage_tiff(), truncated("JPEG"), SVG]
    for p, d in zip(paths, datas, strict=True):
        p.write_bytes(d)
    before = len(os.listdir("/proc/self/fd"))
    for p in [*paths, tmp_path / "missing.png"]:
        try:
            load_image(p)
        except ImageError:
            pass
    assert len(os.listdir("/proc/self/fd")) == before


def test_image_name():
    assert image_name("/data/cats/tabby.jpg") == "tabby.jpg"
    assert image_name(Path("dog.png")) == "dog.png"
    assert image_name(b"\x89PNG") == ""
    upload = io.BytesIO(b"")
    upload.name = "upload.webp"
    assert image_name(upload) == "upload.webp"
    assert image_name(io.BytesIO(b"")) == ""


def test_only_the_allow_listed_decoders_are_tried():
    assert DECODERS == ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP")


def test_no_code_outside_the_image_door_opens_images_with_pillow():
    """Every picture goes through `load_image`; a bare `Image.open` would accept EPS & co."""
    root = ROOT
    sources = [root / "app.py", *root.glob("models/**/*.py"), *root.glob("viz/**/*.py")]
    sources += [*root.glob("bench/**/*.py")]
    offenders = [
        str(p.relative_to(root))
        for p in sources
        if "Image.open(" in p.read_text() and p != root / "models" / "images.py"
    ]
    assert offenders == []
