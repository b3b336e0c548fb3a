"""Every error the service raises on purpose, in one place.

Each class carries the data a caller needs to act on it and a ``title`` in words; none
knows about HTTP. The API maps them to status codes in one table (``api/problems.py``).
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
    """Input that can never succeed: refused before anything is stored."""

    title = "Invalid input"

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)


class BadImageError(BadInputError):
    """Image bytes that cannot be decoded (corrupt, truncated, empty)."""

    title = "Unreadable image"


class UnsupportedImageError(BadInputError):
    """A readable file that is not an image format the service accepts."""

    title = "Unsupported image format"


class ImageTooLargeError(BadInputError):
    """Too many bytes, or too many pixels (decompression bomb)."""

    title = "Image too large"


class BadTextError(BadInputError):
    """Missing, empty or over-long text."""

    title = "Invalid text"


class ImageUrlError(BadInputError):
    """An image URL that is refused or cannot be fetched."""

    title = "Image URL refused"


class UnsupportedMediaTypeError(BadInputError):
    """A request body that is neither multipart/form-data nor JSON."""

    title = "Unsupported media type"


class PayloadTooLargeError(BadInputError):
    """A request body (a manifest, say) over its configured size limit."""

    title = "Payload too large"


class ManifestError(BadInputError):
    """A scan manifest that cannot be read at all (row problems are per-row results)."""

    title = "Invalid manifest"


class ManifestLineTooLongError(PayloadTooLargeError):
    """A manifest line longer than ``OFA_MAX_MANIFEST_LINE_BYTES``, where it refuses the
    whole manifest (the first JSONL line, any CSV record); a later JSONL line that long
    is that row's error instead."""

    title = "Manifest line too long"


class RowError(OfaEntailError):
    """One manifest row cannot succeed; the message becomes that row's result."""


class OverloadedError(OfaEntailError):
    """Too much work is waiting: come back later (load shedding)."""

    def __init__(self, pending: int, limit: int, retry_after_s: int, what: str = "jobs") -> None:
        self.pending, self.limit, self.retry_after_s = pending, limit, retry_after_s
        self.detail = (
            f"{pending} {what} are waiting (the limit is {limit}); cached verdicts and polls "
            f"still work, new work is refused for now: retry in {retry_after_s}s"
        )
        super().__init__(self.detail)


class ScanLimitError(OfaEntailError):
    """This API key has as many scans, or as much scan storage, as it may (429)."""

    def __init__(self, detail: str, retry_after_s: int = 60) -> None:
        self.detail, self.retry_after_s = detail, retry_after_s
        super().__init__(detail)


class ScansBusyError(OfaEntailError):
    """The service runs as many scans as it may, all keys together (503)."""

    def __init__(self, active: int, limit: int, retry_after_s: int = 60) -> None:
        self.active, self.limit, self.retry_after_s = active, limit, retry_after_s
        self.detail = (
            f"{active} scans are running (the service's limit is {limit}); "
            f"retry in {retry_after_s}s"
        )
        super().__init__(self.detail)


class QueueUnavailableError(OfaEntailError):
    """The broker or the durable store cannot be reached."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)


class PayloadStoreUnavailable(OfaEntailError):
    """The payload store (``shared/payloads.py``: images of unfinished jobs) could not be
    reached or refused the operation: a submission is refused with a 503, a worker puts
    the job back to queued."""

    title = "payload store unavailable"

    def __init__(self, where: str, detail: str) -> None:
        self.where = where
        self.detail = f"payload store {where}: {detail}"
        super().__init__(self.detail)
