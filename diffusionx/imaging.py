"""The one image codec of the project: images on the wire are base64-encoded PNG, with size limits checked
before decoding. Imports Pillow and `diffusionx.requests` only, so the torch-free clients use it too."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, UnidentifiedImageError

from diffusionx.requests import MAX_IMAGE_SIDE, InvalidRequestError, check_side

MAX_IMAGE_BASE64_CHARS = 8 * 1024 * 1024  # ~6 MB of PNG


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_png_base64(image: Image.Image) -> str:
    return base64.b64encode(encode_png(image)).decode("ascii")


def decode_png(raw: bytes, field: str = "image") -> Image.Image:
    """PNG (or JPEG/WebP) bytes as an RGB image, or InvalidRequestError saying why not."""
    try:
        image = Image.open(io.BytesIO(raw))
        if image.width > MAX_IMAGE_SIDE or image.height > MAX_IMAGE_SIDE:
            raise InvalidRequestError(
                f"{field} is {image.width}x{image.height}; each side must be at most {MAX_IMAGE_SIDE}"
            )
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise InvalidRequestError(f"{field} does not decode as an image (send a base64 PNG)") from None
    check_side(f"{field} width", image.width)
    check_side(f"{field} height", image.height)
    return image.convert("RGB")


def decode_png_base64(data: str, field: str = "image") -> Image.Image:
    """Decodes a base64 PNG/JPEG/WebP into an RGB image, or raises InvalidRequestError saying why."""
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
    return decode_png(raw, field)
