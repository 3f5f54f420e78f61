"""The one image codec of the project: images on the wire are base64-encoded PNG, with size limits checked
before decoding. Imports Pillow and `diffusionx.requests` only, so the torch-free clients use it too."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import struct
import warnings

from PIL import Image, UnidentifiedImageError

from diffusionx.requests import MAX_IMAGE_SIDE, InvalidRequestError, check_side

MAX_IMAGE_BASE64_CHARS = 8 * 1024 * 1024  # ~6 MB of PNG
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_key(image: Image.Image) -> bytes:
    """A digest of an image's pixels, size and mode: the key of caches of what is computed from an image
    (the same pixels arriving again, e.g. a preview sent back as the next edit's input, find it)."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=16)
    digest.update(f"{image.mode}{image.size}".encode())
    return digest.digest()


def encode_png_base64(image: Image.Image) -> str:
    return base64.b64encode(encode_png(image)).decode("ascii")


def claimed_png_size(raw: bytes) -> tuple[int, int] | None:
    """(width, height) that a PNG's IHDR chunk claims, read from the first 24 bytes without decoding;
    None if `raw` is not a PNG."""
    if len(raw) < 24 or not raw.startswith(_PNG_SIGNATURE) or raw[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", raw[16:24])
    return width, height


def _check_claimed_side(field: str, width: int, height: int) -> None:
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        raise InvalidRequestError(f"{field} is {width}x{height}; each side must be at most {MAX_IMAGE_SIDE}")


def decode_png(raw: bytes, field: str = "image") -> Image.Image:
    """PNG (or JPEG/WebP) bytes as an RGB image, or InvalidRequestError saying why not.

    Decompression bombs are refused before any pixel is decoded: a PNG's claimed size is read from its
    header first, any format's size from Pillow's header parse, and Pillow's own bomb check (its warning
    made an error) stands behind both."""
    claimed = claimed_png_size(raw)
    if claimed is not None:
        _check_claimed_side(field, *claimed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS)
            _check_claimed_side(field, image.width, image.height)
            image.load()
    except InvalidRequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequestError(
            f"{field} claims too many pixels (a decompression bomb?); each side must be at most "
            f"{MAX_IMAGE_SIDE}"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error):
        raise InvalidRequestError(
            f"{field} does not decode as an image (send a base64 PNG; JPEG and WebP are accepted)"
        ) from None
    check_side(f"{field} width", image.width)
    check_side(f"{field} height", image.height)
    return image.convert("RGB")


def decode_png_base64(data: str, field: str = "image") -> Image.Image:
    """Decodes a base64 PNG/JPEG/WebP into an RGB image, or raises InvalidRequestError saying why."""
    return decode_png(decode_base64(data, field), field)


def decode_base64(data: str, field: str = "image") -> bytes:
    """The bytes of a base64 image field (a data URL prefix is tolerated), or InvalidRequestError."""
    if not isinstance(data, str) or not data:
        raise InvalidRequestError(f"{field} must be a non-empty base64-encoded PNG string")
    if len(data) > MAX_IMAGE_BASE64_CHARS:
        raise InvalidRequestError(
            f"{field} is {len(data)} base64 characters; at most {MAX_IMAGE_BASE64_CHARS} are allowed"
        )
    if data.startswith("data:") and "," in data:  # tolerate a data URL prefix
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{field} is not valid base64") from None
    return raw
