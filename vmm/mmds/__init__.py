"""MMDS, the microVM metadata service (Firecracker-compatible), as pure code.

The host writes a JSON document through the REST API; the guest reads it
over HTTP at 169.254.169.254:80, served by a tiny Ethernet/ARP/IPv4/TCP/HTTP
stack ("dumbo") that lives on the virtio-net data path. Nothing here opens
a socket, starts a thread or reads the clock directly: time is injected.

Layers (bottom up): `pdu` (frame parsing and building), `tcp` (one
connection), `handler` (the port-80 listener and its HTTP endpoints), `ns`
(the network stack the device calls), `http` (request → response),
`data_store` and `token` (the data and the V2 session tokens).

Interface for the REST API (``PUT``/``PATCH``/``GET /mmds``, ``PUT /mmds/config``)
-------------------------------------------------------------------------------

One `MmdsStore` per microVM, shared with every network stack::

    store = MmdsStore(size_limit=51200)          # --mmds-size-limit
    store.version = MmdsVersion.V2               # from MmdsConfig.version
    store.imds_compat = True                     # from MmdsConfig.imds_compat
    store.set_aad(instance_id)                   # optional: bind tokens to the VM id
    store.put({"latest": {...}})                 # PUT /mmds (replace)
    store.patch({"latest": {"x": None}})         # PATCH /mmds (RFC 7396 merge patch)
    store.get()                                  # GET /mmds -> dict ({} before any put)
    store.get_path("/latest/meta-data")          # one value, or NotFound

``put``/``patch`` take a JSON object (dict) and raise an `MmdsError`
subclass whose ``str()`` is the fault message: `DataStoreLimitExceeded`
("The MMDS patch request doesn't fit.", for put and patch alike),
`NotInitialized` ("The MMDS data store is not initialized.", patch before
put), `NotAJsonObject`, `InvalidJsonData`. A failed call changes nothing.
The store is thread-safe. Snapshots: ``store.state()`` → `MmdsState`
(version and imds_compat; the data only with ``include_data=True``, which
Firecracker never does) and ``MmdsStore.from_state(state, size_limit=...)``.

Interface for virtio-net (the TX and RX paths of an MMDS-enabled interface)
---------------------------------------------------------------------------

::

    ns = MmdsNetworkStack(store, ipv4_addr=config.effective_ipv4_address, clock=time.monotonic)

    # TX: for every frame the guest sends (without the virtio-net header):
    if ns.detour_frame(frame, csum_partial=bool(hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)):
        ...   # consumed by MMDS: do not write it to the tap
    # RX: whenever a guest RX buffer of `room` bytes (after the header) is free,
    # before reading the tap:
    frame = ns.write_next_frame(room)     # bytes, or None: nothing from MMDS
    # optional: ns.next_timeout() -> clock time at which a retransmission is due

`detour_frame` never raises. `write_next_frame` returns at most `room`
bytes. Call it again until it returns None after any `detour_frame`.
``ns.state()`` / ``MmdsNetworkStack.from_state(state, store)`` persist the
MAC, address and port. ``ns.metrics`` holds counters (Firecracker's
``mmds`` metric names).

`MmdsHttp(store).respond(request_bytes) -> response_bytes` answers a single
HTTP request, for tests and tools.
"""

from vmm.config.mmds import DEFAULT_MMDS_IPV4, MmdsVersion

from .data_store import (
    DEFAULT_DATA_STORE_LIMIT,
    DataStoreLimitExceeded,
    InvalidJsonData,
    InvalidMmdsState,
    JsonValue,
    MmdsError,
    MmdsState,
    MmdsStore,
    NotAJsonObject,
    NotFound,
    NotInitialized,
    OutputFormat,
    UnsupportedValueType,
    format_imds,
    json_merge_patch,
)
from .handler import MAX_CONNECTIONS, MAX_PENDING_RESETS, TcpHandler
from .http import HttpExchange, MmdsHttp
from .ns import DEFAULT_MAC_ADDR, MmdsMetrics, MmdsNetworkStack, MmdsNetworkStackState
from .pdu import MacAddr
from .token import MAX_TOKEN_TTL_SECONDS, MIN_TOKEN_TTL_SECONDS, InvalidTtlValue, MmdsTokenError

__all__ = [
    "DEFAULT_DATA_STORE_LIMIT",
    "DEFAULT_MAC_ADDR",
    "DEFAULT_MMDS_IPV4",
    "MAX_CONNECTIONS",
    "MAX_PENDING_RESETS",
    "MAX_TOKEN_TTL_SECONDS",
    "MIN_TOKEN_TTL_SECONDS",
    "DataStoreLimitExceeded",
    "HttpExchange",
    "InvalidJsonData",
    "InvalidMmdsState",
    "InvalidTtlValue",
    "JsonValue",
    "MacAddr",
    "MmdsError",
    "MmdsHttp",
    "MmdsMetrics",
    "MmdsNetworkStack",
    "MmdsNetworkStackState",
    "MmdsState",
    "MmdsStore",
    "MmdsTokenError",
    "MmdsVersion",
    "NotAJsonObject",
    "NotFound",
    "NotInitialized",
    "OutputFormat",
    "TcpHandler",
    "UnsupportedValueType",
    "format_imds",
    "json_merge_patch",
]
