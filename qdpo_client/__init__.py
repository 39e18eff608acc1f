"""Python client of the qdpo service (sync and async, httpx). Imports no torch.

from qdpo_client import Client
c = Client("http://localhost:8000", api_key=KEY)
job = c.jobs.wait(c.jobs.create(quantization={"method": "nf4"}, method={"type": "qdpo"}).id)
"""

from qdpo_client.async_client import AsyncClient
from qdpo_client.client import Client
from qdpo_client.errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    ChecksumMismatch,
    ConflictError,
    InvalidRequestError,
    JobCancelled,
    JobFailed,
    NotFoundError,
    PayloadTooLargeError,
    QdpoClientError,
    ServerError,
)
from qdpo_client.types import Checkpoint, Event, File, Job, Metric, Model, Page, WebhookDelivery, WebhookEndpoint
from qdpo_client.webhooks import WebhookVerificationError, sign_webhook, verify_webhook

__all__ = [
    "AsyncClient",
    "Client",
    "APIConnectionError",
    "APIError",
    "AuthenticationError",
    "ChecksumMismatch",
    "ConflictError",
    "InvalidRequestError",
    "JobCancelled",
    "JobFailed",
    "NotFoundError",
    "PayloadTooLargeError",
    "QdpoClientError",
    "ServerError",
    "Checkpoint",
    "Event",
    "File",
    "Job",
    "Metric",
    "Model",
    "Page",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookVerificationError",
    "sign_webhook",
    "verify_webhook",
]
