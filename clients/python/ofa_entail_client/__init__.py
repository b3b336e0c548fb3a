"""A Python client for the ofa-entail visual-entailment service (sync and async, on httpx).

    from ofa_entail_client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as ofa:
        result = ofa.check("photo.jpg", "There is a cup of coffee on the table.")
        print(result.verdict.label, result.cached)

Everything public is here: the two clients, what their calls return, their errors
(``ClientError`` and its subclasses) and the service's response models.
"""

from .client import (
    ApiError,
    AsyncClient,
    CheckResult,
    Client,
    ClientError,
    ImageInput,
    JobFailed,
    Progress,
    Submitted,
    WaitTimeout,
)
from .models import (
    ChangeCounts,
    CurvePoint,
    Job,
    JobStatus,
    Label,
    ModelRef,
    Probabilities,
    ScanChange,
    ScanReport,
    ScanStatus,
    ScanSummary,
    Verdict,
)

__version__ = "0.1.0"

__all__ = [
    "ApiError",
    "AsyncClient",
    "ChangeCounts",
    "CheckResult",
    "Client",
    "ClientError",
    "CurvePoint",
    "ImageInput",
    "Job",
    "JobFailed",
    "JobStatus",
    "Label",
    "ModelRef",
    "Probabilities",
    "Progress",
    "ScanChange",
    "ScanReport",
    "ScanStatus",
    "ScanSummary",
    "Submitted",
    "Verdict",
    "WaitTimeout",
    "__version__",
]
