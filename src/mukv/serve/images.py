"""Pushed frames: PNG and JPEG images decoded with PyAV (already a dependency) into uint8 RGB arrays.

The image size is read from the file header and checked against the pixel limit before anything
is decoded, so a small file that declares a huge image (a decompression bomb) costs nothing.
"""

from __future__ import annotations

import struct

import numpy as np

from mukv.serve.errors import ApiError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
# Media type -> FFmpeg decoder.
DECODERS = {"image/png": "png", "image/jpeg": "mjpeg"}
_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png"}
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the size.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Markers without a length field.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def media_type(content_type: str | None) -> str | None:
    """The bare, lower-case media type of a ``Content-Type`` header (aliases folded), or ``None``."""
    if not content_type:
        return None
    bare = content_type.split(";", 1)[0].strip().lower()
    return _ALIASES.get(bare, bare)


def sniff(data: bytes) -> str | None:
    """The media type the bytes start like (``image/png`` or ``image/jpeg``), or ``None``."""
    if data.startswith(PNG_SIGNATURE):
        return "image/png"
    if data.startswith(JPEG_SIGNATURE):
        return "image/jpeg"
    return None


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid_image", message, field=field)


def image_size(data: bytes, kind: str, *, field: str = "body") -> tuple[int, int]:
    """``(width, height)`` declared by a PNG or JPEG header; ``ApiError`` when the bytes are not one."""
    if kind == "image/png":
        if not data.startswith(PNG_SIGNATURE) or len(data) < 24 or data[12:16] != b"IHDR":
            raise _invalid(field, "not a PNG image (no PNG header)")
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if kind == "image/jpeg":
        if not data.startswith(JPEG_SIGNATURE):
            raise _invalid(field, "not a JPEG image (no JPEG header)")
        offset = 2
        while offset + 4 <= len(data):
            if data[offset] != 0xFF:
                raise _invalid(field, f"damaged JPEG: no marker at byte {offset}")
            marker = data[offset + 1]
            if marker == 0xFF:  # fill byte before a marker
                offset += 1
                continue
            if marker in _JPEG_STANDALONE:
                offset += 2
                continue
            (length,) = struct.unpack(">H", data[offset + 2 : offset + 4])
            if marker in _JPEG_SOF:
                if offset + 9 > len(data):
                    break
                height, width = struct.unpack(">HH", data[offset + 5 : offset + 9])
                return width, height
            if marker in (0xD9, 0xDA) or length < 2:  # end of image or scan data before any frame header
                break
            offset += 2 + length
        raise _invalid(field, "damaged JPEG: no frame header with the image size")
    raise ApiError(415, "unsupported_media_type", f"frames must be image/png or image/jpeg, got {kind}", field=field)


def decode_image(data: bytes, kind: str, *, max_pixels: int, field: str = "body") -> np.ndarray:
    """Decode a PNG or JPEG image into uint8 RGB ``[H, W, 3]``.

    Raises :class:`ApiError`: 415 for another media type, 413 (``frame_too_large``) for an image of
    more than ``max_pixels`` pixels, 422 (``invalid_image``) for bytes that do not decode.
    """
    import av

    width, height = image_size(data, kind, field=field)
    if width < 1 or height < 1:
        raise _invalid(field, f"image of {width}x{height} pixels")
    if width * height > max_pixels:
        raise ApiError(
            413,
            "frame_too_large",
            f"frame of {width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,}",
            field=field,
        )
    try:
        codec = av.CodecContext.create(DECODERS[kind], "r")
        frames = codec.decode(av.Packet(data))
        if not frames:
            frames = codec.decode(None)  # some decoders hold the frame until flushed
    except (av.FFmpegError, ValueError) as exc:
        raise _invalid(field, f"cannot decode the {kind.split('/')[1].upper()} image ({exc})") from None
    if not frames:
        raise _invalid(field, f"the {kind.split('/')[1].upper()} image holds no picture")
    frame = frames[0]
    if frame.width * frame.height > max_pixels:  # the header lied: never hand on more than the limit
        raise ApiError(413, "frame_too_large", f"frame of {frame.width}x{frame.height} pixels", field=field)
    return frame.to_ndarray(format="rgb24")
