"""Every error the service raises on purpose, in one place.

Each class carries the data a caller needs to act on it; only the API layer turns
them into HTTP responses (see ``api/problems.py``).
"""

from __future__ import annotations


class OfaEntailError(Exception):
    """Base class of the project's own errors."""


# --- model runtime -------------------------------------------------------------------


class CheckpointError(OfaEntailError):
    """A checkpoint directory is missing a file or holds something unexpected."""

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"{path}: {detail}")


class CheckpointMismatchError(CheckpointError):
    """A tensor is missing, unexpected, or of the wrong shape."""

    def __init__(self, path: str, key: str, detail: str) -> None:
        self.key = key
        super().__init__(path, f"tensor {key!r}: {detail}")


class UnsupportedConfigError(CheckpointError):
    """The checkpoint's configuration asks for something this runtime does not implement."""

    def __init__(self, path: str, key: str, value: object, expected: str) -> None:
        self.key = key
        self.value = value
        super().__init__(path, f"{key}={value!r} is not supported (expected {expected})")


class ModelDownloadError(OfaEntailError):
    """A model id could not be fetched (offline, unknown id or revision)."""

    def __init__(self, model_id: str, revision: str | None, reason: str) -> None:
        self.model_id = model_id
        self.revision = revision
        self.reason = reason
        rev = f" (revision {revision})" if revision else ""
        super().__init__(
            f"could not download model {model_id!r}{rev}: {reason}. "
            "To run offline, point OFA_MODEL_DIR (or --model) at a local ModelScope "
            "checkpoint directory (config.json, configuration.json, pytorch_model.bin, "
            "vocab.json, merges.txt); `ofa-entail model tiny DIR` writes a small random one."
        )


# --- input ---------------------------------------------------------------------------


class BadInputError(OfaEntailError):
    """Input that can never succeed; ``status`` is the HTTP status the API answers with."""

    status = 422
    title = "Invalid input"
    type_slug = "invalid-input"

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)


class BadImageError(BadInputError):
    """Image bytes that cannot be decoded (corrupt, truncated, empty)."""

    status = 400
    title = "Unreadable image"
    type_slug = "bad-image"


class UnsupportedImageError(BadInputError):
    """A readable file that is not an image format the service accepts."""

    status = 415
    title = "Unsupported image format"
    type_slug = "unsupported-image"


class ImageTooLargeError(BadInputError):
    """Too many bytes, or too many pixels (decompression bomb)."""

    status = 413
    title = "Image too large"
    type_slug = "image-too-large"


class BadTextError(BadInputError):
    """Missing, empty or over-long text."""

    status = 422
    title = "Invalid text"
    type_slug = "bad-text"


class ImageUrlError(BadInputError):
    """An image URL that is refused or cannot be fetched."""

    status = 400
    title = "Image URL refused"
    type_slug = "bad-image-url"


class UnsupportedMediaTypeError(BadInputError):
    """A request body that is neither multipart/form-data nor JSON."""

    status = 415
    title = "Unsupported media type"
    type_slug = "unsupported-media-type"


class QueueUnavailableError(OfaEntailError):
    """The broker or the durable store cannot be reached."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)
