"""Load a user-supplied picture as an 8-bit RGB PIL image, or fail with one clear line.

`load_image` is the one door through which pictures enter Attention Lens (upload widget,
command line, sample folder). It accepts a path, raw bytes or a binary file object and
returns a fresh, fully decoded ``"RGB"`` image that owns no file handle. Everything it
cannot turn into such an image raises `ImageError`, whose message is a single line.

Policy, in the order applied:

* Formats: only common raster formats are tried (`DECODERS`). Pillow's other plugins
  (EPS, which runs Ghostscript; PSD; FITS; ...) are never asked to open user data.
* Size: the pixel count declared in the header is checked against ``max_pixels``
  (default `DEFAULT_MAX_PIXELS`, 40 megapixels) *before* any pixel is decoded. Pillow's
  own ``DecompressionBombWarning``/``DecompressionBombError`` become `ImageError` too.
* Truncated files are refused. The module never sets ``ImageFile.LOAD_TRUNCATED_IMAGES``;
  if another part of the process sets it, Pillow fills truncated images with grey instead.
* Frames: the first frame of an animated GIF/WebP/PNG and the first page of a TIFF.
* Orientation: the EXIF orientation tag is applied (`PIL.ImageOps.exif_transpose`); an
  unreadable EXIF block is ignored and the image is used as stored.
* Colour: every mode becomes 8-bit RGB. Transparency (``RGBA``, ``LA``, ``PA``, ``RGBa``,
  palette or single-colour transparency) is composited over white. 16-bit greyscale
  (``I;16*``) is scaled by the format's full range, 65535 -> 255, so levels stay as a
  viewer shows them. 32-bit integer ``I`` and float ``F`` images have no conventional
  range and are scaled by their own maximum (0 stays black, ratios are kept); ``F``
  images already within [0, 1] are taken as absolute levels; images with negative values
  are stretched linearly from their minimum to their maximum; NaN reads as the minimum.
  Embedded ICC profiles are not applied (CMYK uses Pillow's plain conversion).

Thread safety: the decompression-bomb warning is turned into an error with
`warnings.catch_warnings`, which changes the process-wide warning filters while an image
is opened.
"""

from __future__ import annotations

import functools
import io
import os
import stat
import warnings
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.errors import one_line

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DECODERS",
    "IMAGE_EXTENSIONS",
    "REFUSED_IMAGE_EXTENSIONS",
    "ImageError",
    "ImageSource",
    "image_folder",
    "image_name",
    "load_image",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".tif", ".tiff", ".bmp")
"""The one list of file extensions decoded (by the allow-listed formats below)."""
REFUSED_IMAGE_EXTENSIONS = (".avif", ".ppm", ".pgm", ".pbm", ".ico", ".jp2", ".j2k")
"""Image files a folder walk still collects, so each gets a one-line refusal, not silence."""

DEFAULT_MAX_PIXELS = 40_000_000
"""Largest accepted image, in pixels (width x height): about 7700 x 5200."""

DECODERS = ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP")
"""The allow-list: the only Pillow decoders that ever see user data (GIF: first frame).

Pictures come from the internet (data sets, uploads); every other Pillow plugin is a parser
we do not need to trust (EPS runs Ghostscript on the file's PostScript)."""

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes]

_WHITE = (255, 255, 255, 255)
_SNIFF_BYTES = 1024
_MAX_MESSAGE = 300
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_SIGNATURES = {  # leading bytes of supported formats, to tell "corrupt" from "not an image"
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"BM": "BMP",
}


class ImageError(ValueError):
    """The source is not a loadable image. ``str(error)`` is one line naming the problem."""


class _Unreadable(Exception):
    """Internal: the problem, without the source's name (added by `load_image`)."""


def image_name(source: ImageSource) -> str:
    """A short display name for `source`: the file's base name, or ``""`` when it has none.

    Args:
        source: A path, bytes, or a file object (its ``name`` attribute is used, as on
            open files and Streamlit uploads).

    Returns:
        The last path component, e.g. ``"cat.jpg"``; ``""`` for bytes and nameless streams.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return ""
    name = source if isinstance(source, (str, os.PathLike)) else getattr(source, "name", None)
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str):
        return ""
    return os.path.basename(name.rstrip("/\\")) or name


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `source` into a new 8-bit ``"RGB"`` image, following the module's policy.

    Args:
        source: A path (``str`` or path-like), the file's bytes, or a binary file object
            (read from its start; left open, as the caller owns it).
        max_pixels: Largest accepted width x height, checked on the declared size before
            decoding; ``None`` leaves only Pillow's own decompression-bomb limit.

    Returns:
        A fully loaded ``"RGB"`` image, independent of any file.

    Raises:
        ImageError: The source is missing, empty, not a supported image, too large,
            truncated or corrupt. The message is one line and names the source when it
            has a name.
        TypeError: `source` is none of the accepted kinds.
        ValueError: `max_pixels` is not positive.
    """
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be positive or None, got {max_pixels}")
    name = one_line(image_name(source), _MAX_MESSAGE)
    label = f"cannot load image {name!r}" if name else "cannot load image"
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            return _load(io.BytesIO(source), max_pixels)
        if isinstance(source, (str, os.PathLike)):
            with _open_path(source) as fp:
                return _load(fp, max_pixels)
        if callable(getattr(source, "read", None)):
            return _load(_seekable(source), max_pixels)
    except _Unreadable as problem:
        raise ImageError(f"{label}: {problem}") from problem.__cause__
    raise TypeError(f"expected a path, bytes or a binary file object, got {type(source).__name__}")


def _open_path(path: str | os.PathLike) -> IO[bytes]:
    """Open `path` for reading, turning the usual failures into one-line problems.

    Only regular files with data are read: a FIFO or a device would block forever, and /proc
    files report size 0 (and may block too).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as e:
        raise _Unreadable("no such file") from e
    except IsADirectoryError as e:
        raise _Unreadable("this is a directory, not a file") from e
    except PermissionError as e:
        raise _Unreadable("permission denied") from e
    except (OSError, ValueError) as e:
        raise _Unreadable(f"cannot open the file ({one_line(e, _MAX_MESSAGE)})") from e
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise _Unreadable(f"this is {kind}, not an image file")
    if info.st_size == 0:
        os.close(fd)
        raise _Unreadable("the file is empty")
    return os.fdopen(fd, "rb")  # closed by the caller's `with`


def _seekable(fp: IO[bytes]) -> IO[bytes]:
    """`fp` itself when it can seek, else its remaining bytes in memory."""
    if isinstance(fp, io.TextIOBase):
        raise _Unreadable("the stream gives text, not bytes (open the file in binary mode)")
    try:
        if fp.seekable():
            return fp
    except (AttributeError, OSError, ValueError):
        pass
    try:
        data = fp.read()
    except Exception as e:
        raise _Unreadable(f"cannot read the stream ({one_line(e, _MAX_MESSAGE)})") from e
    if not isinstance(data, (bytes, bytearray)):
        raise _Unreadable("the stream gives text, not bytes (open the file in binary mode)")
    return io.BytesIO(data)


@functools.cache
def _formats() -> tuple[str, ...]:
    """The entries of `DECODERS` that this Pillow build can open."""
    Image.init()
    return tuple(f for f in DECODERS if f in Image.OPEN)


def _load(fp: IO[bytes], max_pixels: int | None) -> Image.Image:
    """Open, check, decode and convert the image in `fp` (seekable; not closed here)."""
    bomb = (Image.DecompressionBombError, Image.DecompressionBombWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(fp, formats=_formats())
        except UnidentifiedImageError as e:
            raise _Unreadable(_sniff(fp)) from e
        except bomb as e:
            raise _Unreadable(f"the image is too large ({one_line(e, _MAX_MESSAGE)})") from e
        except Exception as e:
            fmt = _signature_format(_head(fp) or b"") or "image"
            raise _Unreadable(_decode_problem(f"the {fmt} header is unreadable", e)) from e
        with im:
            _check_size(im.size, max_pixels)
            try:
                im.load()
            except bomb as e:
                raise _Unreadable(f"the image is too large ({one_line(e, _MAX_MESSAGE)})") from e
            except Exception as e:
                raise _Unreadable(_decode_problem(f"the {im.format} data is corrupt", e)) from e
            _check_size(im.size, max_pixels)  # a few plugins learn the real size while loading
            try:
                ImageOps.exif_transpose(im, in_place=True)
            except Exception:  # a broken EXIF block must not cost the picture
                pass
            return _to_rgb(im)


def _decode_problem(problem: str, error: Exception) -> str:
    """`problem`, or "the file is truncated" when Pillow says so, with Pillow's words."""
    text = _describe(error)
    if "truncated" in text.lower():
        problem = "the file is truncated"
    return f"{problem} ({text})"


def _check_size(size: tuple[int, int], max_pixels: int | None) -> None:
    """Refuse empty images and those above `max_pixels`."""
    width, height = size
    if width < 1 or height < 1:
        raise _Unreadable(f"the image has no pixels ({width} x {height})")
    if max_pixels is not None and width * height > max_pixels:
        raise _Unreadable(
            f"the image is too large: {width} x {height} = {width * height / 1e6:.1f} megapixels, "
            f"the limit is {max_pixels / 1e6:g} megapixels"
        )


def _to_rgb(im: Image.Image) -> Image.Image:
    """A new 8-bit RGB image from any Pillow mode (see the module docstring)."""
    mode = im.mode
    try:
        if mode.startswith("I;16") or mode in ("I", "F"):
            return Image.fromarray(_grey_levels(np.asarray(im), mode)).convert("RGB")
        if im.has_transparency_data:
            rgba = im.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", im.size, _WHITE), rgba).convert("RGB")
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise _Unreadable(f"unsupported colour mode {mode!r} ({_describe(e)})") from e


def _grey_levels(values: np.ndarray, mode: str) -> np.ndarray:
    """Map 16-bit, 32-bit integer or float grey levels to uint8, keeping relative levels."""
    a = values.astype(np.float32)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    if mode.startswith("I;16"):
        offset, scale = 0.0, 65535.0
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
        offset, scale = 0.0, 1.0
    elif lo >= 0.0:
        offset, scale = 0.0, hi
    else:
        offset, scale = lo, hi - lo
    if scale <= 0.0:
        return np.zeros(a.shape, np.uint8)
    a -= offset
    a *= 255.0 / scale
    a += 0.5
    return np.clip(a, 0.0, 255.0).astype(np.uint8)


def _sniff(fp: IO[bytes]) -> str:
    """Name what `fp` holds when no image format recognised it."""
    head = _head(fp)
    supported = ", ".join(_formats())
    if head is None:
        return f"not a recognised image format (supported: {supported})"
    if not head:
        return "the file is empty"
    if head.startswith(b"%PDF"):
        return "this is a PDF document, not an image"
    fmt = _signature_format(head)
    if fmt:
        return f"the {fmt} header is corrupt"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIF_BRANDS:
            return "HEIC/HEIF images are not supported; convert it to JPEG or PNG"
        return f"this is an ISO media file (brand {one_line(brand.decode('latin-1'), _MAX_MESSAGE)!r}), not an image"
    if b"<svg" in head.lower():
        return "SVG vector images are not supported; export it as PNG"
    if head.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")):
        return "PostScript/EPS files are not supported; export it as PNG"
    if head.startswith(b"8BPS"):
        return "Photoshop files are not supported; export it as PNG or JPEG"
    if _looks_like_text(head):
        return "this is a text file, not an image"
    return f"not a recognised image format (supported: {supported})"


def _head(fp: IO[bytes]) -> bytes | None:
    """The first bytes of `fp`, or None when they cannot be read."""
    try:
        fp.seek(0)
        head = fp.read(_SNIFF_BYTES)
    except Exception:
        return None
    return bytes(head) if isinstance(head, (bytes, bytearray)) else None


def _signature_format(head: bytes) -> str | None:
    """The supported format whose signature `head` starts with, if any."""
    for signature, fmt in _SIGNATURES.items():
        if head.startswith(signature):
            return fmt
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _looks_like_text(head: bytes) -> bool:
    """Whether `head` reads as mostly printable UTF-8 text."""
    text = head.decode("utf-8", errors="replace")
    printable = sum(c.isprintable() or c in "\t\r\n\f" for c in text)
    return b"\x00" not in head and printable >= 0.95 * len(text)


def _describe(error: BaseException) -> str:
    """``Type: message`` on one line."""
    text = one_line(error, _MAX_MESSAGE)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def image_folder(
    root: str | os.PathLike, *, max_images: int = 20_000, max_entries: int = 200_000
) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) of the images in an ImageFolder layout, and the class names.

    One subfolder per class; images are regular files with an image extension, found
    recursively. Symbolic links are skipped (no loops, no escape from `root`), and the walk
    stops with `ImageError` after `max_entries` directory entries or `max_images` images, so
    pointing it at `/usr` costs a second, not the server's memory.

    Raises:
        ImageError: no class subfolders, no images, or over a limit (one line).
    """
    base = os.fspath(root)
    try:
        top = sorted(e.name for e in os.scandir(base) if e.is_dir(follow_symlinks=False))
    except OSError as e:
        raise ImageError(
            f"cannot read the folder ({one_line(e.strerror or e, _MAX_MESSAGE)})"
        ) from None
    classes = [c for c in top if not c.startswith(".")]
    if not classes:
        raise ImageError("the folder has no class subfolders (one subfolder per class)")
    samples: list[tuple[str, int]] = []
    seen = 0
    for index, name in enumerate(classes):
        stack = [os.path.join(base, name)]
        while stack:
            folder = stack.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue  # unreadable subfolder: skipped
            for entry in entries:
                seen += 1
                if seen > max_entries:
                    raise ImageError(
                        f"the folder tree has over {max_entries} entries; choose a smaller one"
                    )
                if entry.is_symlink():
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False) and entry.name.lower().endswith(
                    IMAGE_EXTENSIONS
                ):
                    samples.append((entry.path, index))
                    if len(samples) > max_images:
                        raise ImageError(
                            f"the folder holds over {max_images} images, the limit for one run"
                        )
    if not samples:
        raise ImageError("no image files in the class subfolders")
    samples.sort()
    return samples, classes
