"""Python SDK for the WHAGO campaigns API: `WhagoClient` (and `AsyncWhagoClient` on grpc.aio, in
`whago_client.aio`), typed `errors`, and `Pager` / `AsyncPager`."""

from whago_client import errors
from whago_client.aio import AsyncPager, AsyncWhagoClient
from whago_client.client import DEFAULT_TARGET, WhagoClient
from whago_client.errors import WhagoError, from_rpc_error
from whago_client.inputs import (
    FINAL_CAMPAIGN_STATES,
    campaign_state,
    import_requests,
    message_state,
    read_contacts_csv,
    to_contact_input,
)
from whago_client.pager import Pager
from whago_client.retry import RetryPolicy

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGET",
    "FINAL_CAMPAIGN_STATES",
    "AsyncPager",
    "AsyncWhagoClient",
    "Pager",
    "RetryPolicy",
    "WhagoClient",
    "WhagoError",
    "__version__",
    "campaign_state",
    "errors",
    "from_rpc_error",
    "import_requests",
    "message_state",
    "read_contacts_csv",
    "to_contact_input",
]
