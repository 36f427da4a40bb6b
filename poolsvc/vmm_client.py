"""A small HTTP/1.1 client for one VMM's API socket (Firecracker's REST API).

Primer. A Firecracker-compatible VMM serves its API on a Unix socket: JSON
request bodies, 204 No Content on success for PUT/PATCH, 200 with a JSON
body for GET, and on failure a 4xx/5xx with ``{"fault_message": "..."}``.
`VmmClient` keeps one keep-alive connection (``http.client`` over
``AF_UNIX``), reconnecting once if the server closed an idle connection.
A failed request raises `VmmApiError` carrying the status and the VMM's
``fault_message``; a socket that cannot be reached raises
`VmmConnectionError`. Nothing here imports `vmm/`: any Firecracker-compatible
VMM can stand behind the socket.

The client is not thread-safe: use one per thread (or a lock), as the pool
service does with one client per microVM.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "VmmClientError",
    "VmmConnectionError",
    "VmmApiError",
    "VmmResponse",
    "VmmClient",
    "DEFAULT_TIMEOUT",
]

#: Seconds a request may take (connect, send, answer).
DEFAULT_TIMEOUT = 10.0


class VmmClientError(Exception):
    """A request to a VMM's API socket failed."""


class VmmConnectionError(VmmClientError):
    """The VMM's API socket could not be reached, or the connection broke mid-request."""


class VmmApiError(VmmClientError):
    """The VMM answered with an error status (its ``fault_message`` says why)."""

    def __init__(self, method: str, path: str, status: int, fault_message: str) -> None:
        super().__init__(f"{method} {path}: {status} {fault_message}")
        self.method = method
        self.path = path
        self.status = status
        self.fault_message = fault_message


@dataclass(frozen=True)
class VmmResponse:
    """One HTTP response: status and raw body."""

    status: int
    body: bytes

    def json(self) -> Any:
        """The body as JSON (None for an empty body)."""
        return json.loads(self.body) if self.body else None


class _UnixHTTPConnection(http.client.HTTPConnection):
    """`http.client.HTTPConnection` whose transport is a Unix stream socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _fault_message(body: bytes, status: int) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        for key in ("fault_message", "error"):  # "error": micro-http's own key
            if isinstance(doc.get(key), str):
                return doc[key]
    text = body.decode(errors="replace").strip()
    return text[:500] if text else http.client.responses.get(status, "error")


class VmmClient:
    """Keep-alive JSON requests to the VMM listening at `api_sock`."""

    def __init__(self, api_sock: str | Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.api_sock = str(api_sock)
        self.timeout = timeout
        self._conn = _UnixHTTPConnection(self.api_sock, timeout)
        self.requests = 0

    def __repr__(self) -> str:
        return f"<VmmClient {self.api_sock} requests={self.requests}>"

    # --- transport ------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None) -> VmmResponse:
        """Send one request (`body`: JSON-able, or None) and return the response, whatever its status."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            fresh = self._conn.sock is None
            try:
                self._conn.request(method, path, body=data, headers=headers)
                resp = self._conn.getresponse()
                payload = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self._conn.close()
                # An idle keep-alive connection the server closed: reconnect once. A fresh
                # connection that breaks means the VMM went away mid-request.
                if fresh or attempt == 2:
                    raise VmmConnectionError(f"{method} {path}: connection to {self.api_sock} broke: {exc}") \
                        from exc
                continue
            except (OSError, http.client.HTTPException) as exc:
                self._conn.close()
                raise VmmConnectionError(f"{method} {path}: cannot talk to {self.api_sock}: {exc}") from exc
            self.requests += 1
            if resp.will_close:
                self._conn.close()
            return VmmResponse(resp.status, payload)
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """`request`, raising `VmmApiError` unless the status is 2xx; returns the JSON body (None if empty)."""
        resp = self.request(method, path, body)
        if not 200 <= resp.status < 300:
            raise VmmApiError(method, path, resp.status, _fault_message(resp.body, resp.status))
        try:
            return resp.json()
        except ValueError as exc:
            raise VmmClientError(f"{method} {path}: the VMM answered {resp.status} with a body that is not "
                                 f"JSON: {resp.body[:200]!r}") from exc

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def put(self, path: str, body: Any) -> Any:
        return self.call("PUT", path, body)

    def patch(self, path: str, body: Any) -> Any:
        return self.call("PATCH", path, body)

    def wait_until_listening(self, timeout: float, *, alive: Callable[[], bool] | None = None) -> None:
        """Connect, retrying while the socket does not exist or refuses, for up to `timeout` seconds.

        The VMM creates its socket a few milliseconds after it starts; the
        retries begin at 0.2 ms and back off to 10 ms. `alive` (the VMM
        process still runs) is asked before each retry: when it says False,
        waiting stops at once.
        """
        deadline = time.monotonic() + timeout
        delay = 0.0002
        while True:
            if self._conn.sock is not None:
                return
            try:
                self._conn.connect()
                return
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                self._conn.close()
                if time.monotonic() >= deadline:
                    raise VmmConnectionError(f"no VMM listening at {self.api_sock} after {timeout} s: {exc}") \
                        from exc
                if alive is not None and not alive():
                    raise VmmConnectionError(f"the VMM exited before listening at {self.api_sock}") from exc
            except OSError as exc:
                self._conn.close()
                raise VmmConnectionError(f"cannot connect to {self.api_sock}: {exc}") from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> VmmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- Firecracker's API, the calls the pool service makes ------------------------------

    def describe_instance(self) -> dict[str, Any]:
        """``GET /``: id, state ("Not started", "Running", "Paused"), versions."""
        return self.get("/")

    def put_boot_source(self, kernel_image_path: str, boot_args: str | None = None,
                        initrd_path: str | None = None) -> None:
        body: dict[str, Any] = {"kernel_image_path": kernel_image_path}
        if boot_args is not None:
            body["boot_args"] = boot_args
        if initrd_path is not None:
            body["initrd_path"] = initrd_path
        self.put("/boot-source", body)

    def put_machine_config(self, vcpu_count: int, mem_size_mib: int, **extra: Any) -> None:
        self.put("/machine-config", {"vcpu_count": vcpu_count, "mem_size_mib": mem_size_mib, **extra})

    def put_drive(self, drive_id: str, path_on_host: str, *, is_root_device: bool, is_read_only: bool) -> None:
        self.put(f"/drives/{drive_id}", {"drive_id": drive_id, "path_on_host": path_on_host,
                                         "is_root_device": is_root_device, "is_read_only": is_read_only})

    def put_vsock(self, guest_cid: int, uds_path: str) -> None:
        self.put("/vsock", {"guest_cid": guest_cid, "uds_path": uds_path})

    def instance_start(self) -> None:
        self.put("/actions", {"action_type": "InstanceStart"})

    def pause(self) -> None:
        self.patch("/vm", {"state": "Paused"})

    def resume(self) -> None:
        self.patch("/vm", {"state": "Resumed"})

    def create_snapshot(self, snapshot_path: str, mem_file_path: str, snapshot_type: str = "Full") -> None:
        self.put("/snapshot/create", {"snapshot_path": snapshot_path, "mem_file_path": mem_file_path,
                                      "snapshot_type": snapshot_type})

    def load_snapshot(self, snapshot_path: str, mem_file_path: str, *, resume_vm: bool = False,
                      vsock_uds_path: str | None = None,
                      drive_overrides: dict[str, str] | None = None,
                      network_overrides: dict[str, str] | None = None) -> None:
        """``PUT /snapshot/load`` with the File memory backend, a vsock override, drive and TAP overrides."""
        body: dict[str, Any] = {"snapshot_path": snapshot_path,
                                "mem_backend": {"backend_type": "File", "backend_path": mem_file_path},
                                "resume_vm": resume_vm}
        if vsock_uds_path is not None:
            body["vsock_override"] = {"uds_path": vsock_uds_path}
        if drive_overrides:
            body["drive_overrides"] = [{"drive_id": k, "path_on_host": v} for k, v in drive_overrides.items()]
        if network_overrides:
            body["network_overrides"] = [{"iface_id": k, "host_dev_name": v} for k, v in network_overrides.items()]
        self.put("/snapshot/load", body)
