"""The operator side of the pool service: `ember pool|sandbox|template|status|acquire`.

    ember pool ls
    ember pool set NAME --min-warm N --max-warm M
    ember pool drain NAME                         (set 0/0: warm sandboxes go, leases stay)
    ember sandbox ls [--template NAME]
    ember sandbox exec [--env K=V]... [--timeout S] [--stdin] ID -- ARGV...
    ember sandbox kill ID                         (Release: the microVM is destroyed)
    ember sandbox cp [--mode OCTAL] SRC DST       (one of them ID:/path in the guest; the other a
                                                   local path, or - for stdin/stdout)
    ember template create NAME [--kernel K] [--rootfs R] [--initrd I] [--boot-args A]
                               [--vcpus N] [--mem MIB]
    ember template ls
    ember template rm NAME
    ember status
    ember acquire TEMPLATE [--ttl S] [--meta K=V]... [--idempotency-key KEY]
    ember bench load --template NAME --duration S [--clients N] [--rate R] ... (bench/load.py)

Every command finds the service at ``--addr``, else ``$EMBER_ADDR``, else
127.0.0.1:50051; speaks TLS with ``--tls-ca PEM`` (``$EMBER_TLS_CA``: the CA
of the service's certificate) and presents a client certificate with
``--tls-cert``/``--tls-key`` (mTLS); sends ``--token`` (better:
``$EMBER_TOKEN``, which ``ps`` does not show) as ``authorization: Bearer``;
``--tenant NAME`` lets an admin manage another tenant's pools and
templates. Every command takes ``--json`` (one JSON document on stdout instead of a
table) and ``--deadline SECONDS`` (the call's gRPC deadline; template
creation boots and snapshots a VM, so it defaults to an hour and shows
progress on stderr meanwhile). An error is one line on stderr — the gRPC
status code's name and its details — and exit status 1. `sandbox exec`
exits with the command's status (124 if it timed out, 128+N if signal N
killed it), like ssh.

`template create` without ``--kernel`` takes the kernel, root filesystem
(or initramfs) and boot arguments of the built guest images
(`ember images build`); paths are sent absolute, as the service's host sees
them — this CLI runs on that host.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grpc

from . import proto
from .auth import AuthError, client_channel

DEFAULT_ADDR = "127.0.0.1:50051"
DEFAULT_DEADLINE = 30.0
CREATE_TEMPLATE_DEADLINE = 3600.0
#: Seconds between progress lines while a template is being created.
PROGRESS_INTERVAL = 5.0
#: timeout(1)'s status for a command that ran out of time.
EXIT_TIMED_OUT = 124


class ClientError(Exception):
    """The command cannot be sent as given."""


def service_addr(flag: str | None) -> str:
    """``--addr``, else $EMBER_ADDR, else 127.0.0.1:50051."""
    return flag or os.environ.get("EMBER_ADDR") or DEFAULT_ADDR


# ---- protobuf -> plain JSON-able values -----------------------------------------

def _enum_name(enum_type: Any, value: int, prefix: str) -> str:
    try:
        name = enum_type.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix).lower()


def _iso(ts: Any, present: bool) -> str | None:
    if not present:
        return None
    return datetime.datetime.fromtimestamp(ts.ToNanoseconds() / 1e9, datetime.timezone.utc) \
        .isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _with_tenant(d: dict[str, Any], msg: Any) -> dict[str, Any]:
    """`d` plus the owner tenant, when the service names one."""
    tenant = getattr(msg, "tenant", "")
    if tenant:
        d["tenant"] = tenant
    return d


def sandbox_dict(pb2: Any, s: Any) -> dict[str, Any]:
    return _with_tenant({
        "id": s.id, "template": s.template,
        "state": _enum_name(pb2.SandboxState, s.state, "SANDBOX_STATE_"),
        "agent": {"vsock_uds_path": s.agent.vsock_uds_path, "port": s.agent.port},
        "network": {"ip_address": s.network.ip_address, "tap": s.network.tap},
        "lease_deadline": _iso(s.lease_deadline, s.HasField("lease_deadline")),
        "metadata": dict(s.metadata),
    }, s)


def template_dict(pb2: Any, t: Any) -> dict[str, Any]:
    return _with_tenant({
        "name": t.name, "state": _enum_name(pb2.TemplateState, t.state, "TEMPLATE_STATE_"),
        "vcpus": t.vcpus, "mem_mib": t.mem_mib, "created": _iso(t.created, t.HasField("created")),
        "kernel": t.kernel, "rootfs": t.rootfs, "initrd": t.initrd, "boot_args": t.boot_args,
    }, t)


def pool_dict(p: Any) -> dict[str, Any]:
    return _with_tenant({
        "template": p.template, "min_warm": p.min_warm, "max_warm": p.max_warm,
        "warm": p.warm, "leased": p.leased, "restoring": p.restoring,
        "launches_total": p.launches_total, "failures_total": p.failures_total,
        "launch_rate": round(p.launch_rate, 2), "mem_mib": p.mem_mib,
    }, p)


# ---- output ---------------------------------------------------------------------

def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart, headers first."""
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _emit(args: argparse.Namespace, doc: Any, text: str) -> None:
    print(json.dumps(doc, indent=2) if args.json else text)


def _lease_left(d: dict[str, Any], now: float) -> str:
    if d["lease_deadline"] is None:
        return "-"
    deadline = datetime.datetime.fromisoformat(d["lease_deadline"].replace("Z", "+00:00")).timestamp()
    return f"{max(0.0, deadline - now):.0f}s"


def _sandbox_table(sandboxes: list[dict[str, Any]]) -> str:
    now = time.time()
    return table(("ID", "TEMPLATE", "STATE", "IP", "LEASE LEFT", "AGENT"),
                 [(s["id"], s["template"], s["state"], s["network"]["ip_address"] or "-",
                   _lease_left(s, now),
                   f'{s["agent"]["vsock_uds_path"]}:{s["agent"]["port"]}' if s["agent"]["vsock_uds_path"] else "-")
                  for s in sandboxes])


def _pool_table(pools: list[dict[str, Any]]) -> str:
    return table(("TEMPLATE", "MIN", "MAX", "WARM", "LEASED", "RESTORING"),
                 [(p["template"], p["min_warm"], p["max_warm"], p["warm"], p["leased"], p["restoring"])
                  for p in pools])


def _key_values(pairs: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ClientError(f"{what} {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def _duration(pb_duration: Any, seconds: float) -> None:
    pb_duration.FromNanoseconds(int(round(seconds * 1e9)))


# ---- commands -------------------------------------------------------------------

class _Client:
    """One channel to the service for one command."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.pb2, pb2_grpc = proto.load()
        self.addr = service_addr(args.addr)
        self.deadline: float | None = args.deadline
        self.channel = client_channel(self.addr, tls_ca=args.tls_ca or os.environ.get("EMBER_TLS_CA") or None,
                                      token=args.token or os.environ.get("EMBER_TOKEN") or None,
                                      cert=args.tls_cert, key=args.tls_key)
        self.stub = pb2_grpc.PoolServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()


def cmd_pool(args: argparse.Namespace, c: _Client) -> int:
    pb2 = c.pb2
    if args.pool_cmd == "ls":
        pools = [pool_dict(p) for p in c.stub.ListPools(pb2.ListPoolsRequest(), timeout=c.deadline).pools]
        _emit(args, pools, _pool_table(pools))
        return 0
    if args.pool_cmd == "set":
        lo, hi = args.min_warm, args.max_warm
    else:  # drain
        lo, hi = 0, 0
    status = pool_dict(c.stub.SetPool(pb2.SetPoolRequest(template=args.name, min_warm=lo, max_warm=hi,
                                                         tenant=args.tenant or ""), timeout=c.deadline))
    _emit(args, status, _pool_table([status]))
    return 0


def cmd_status(args: argparse.Namespace, c: _Client) -> int:
    pools = [pool_dict(p) for p in c.stub.ListPools(c.pb2.ListPoolsRequest(), timeout=c.deadline).pools]
    keys = ("warm", "leased", "restoring", "launches_total", "failures_total", "launch_rate", "mem_mib")
    total = {k: sum(p[k] for p in pools) for k in keys}
    total["launch_rate"] = round(total["launch_rate"], 2)
    if args.json:
        _emit(args, {"addr": c.addr, "pools": pools, "total": total}, "")
        return 0
    rows: list[Sequence[Any]] = [(p["template"], *(p[k] for k in keys)) for p in pools]
    rows.append(("TOTAL", *(total[k] for k in keys)))
    print(f"ember pool service at {c.addr}: {len(pools)} pool{'s' if len(pools) != 1 else ''}")
    print(table(("TEMPLATE", "WARM", "LEASED", "RESTORING", "LAUNCHES", "FAILURES", "LAUNCH/S",
                 "MEM_MIB"), rows))
    print("LAUNCH/S: restores per second over the last minute; MEM_MIB: guest memory committed")
    return 0


def cmd_acquire(args: argparse.Namespace, c: _Client) -> int:
    req = c.pb2.AcquireRequest(template=args.template, metadata=_key_values(args.meta, "--meta"),
                               idempotency_key=args.idempotency_key or "")
    if args.ttl is not None:
        _duration(req.lease_ttl, args.ttl)
    s = sandbox_dict(c.pb2, c.stub.Acquire(req, timeout=c.deadline))
    _emit(args, s, _sandbox_table([s]))
    return 0


def cmd_sandbox(args: argparse.Namespace, c: _Client) -> int:
    pb2 = c.pb2
    if args.sandbox_cmd == "ls":
        resp = c.stub.List(pb2.ListRequest(template=args.template or ""), timeout=c.deadline)
        sandboxes = [sandbox_dict(pb2, s) for s in resp.sandboxes]
        _emit(args, sandboxes, _sandbox_table(sandboxes))
        return 0
    if args.sandbox_cmd == "kill":
        c.stub.Release(pb2.ReleaseRequest(id=args.id), timeout=c.deadline)
        _emit(args, {"id": args.id, "released": True}, f"released {args.id}")
        return 0
    if args.sandbox_cmd == "cp":
        return _copy(args, c)
    return _exec(args, c)


#: Bytes per WriteFile message: well under gRPC's 4 MiB message limit.
UPLOAD_CHUNK = 1 << 20


def _guest_side(spec: str) -> tuple[str, str] | None:
    """``ID:/path`` -> (ID, /path); anything else (a local path) -> None."""
    sandbox_id, sep, path = spec.partition(":")
    if sep and sandbox_id and "/" not in sandbox_id and path.startswith("/"):
        return sandbox_id, path
    return None


def _copy(args: argparse.Namespace, c: _Client) -> int:
    src, dst = _guest_side(args.src), _guest_side(args.dst)
    if (src is None) == (dst is None):
        raise ClientError("exactly one of SRC and DST must be ID:/path in a sandbox "
                          "(the other a local path, or -)")
    if src is not None:
        sandbox_id, path = src
        stream = c.stub.ReadFile(c.pb2.ReadFileRequest(id=sandbox_id, path=path), timeout=c.deadline)
        total = 0
        if args.dst == "-":
            for chunk in stream:
                _write(sys.stdout, chunk.data)
                total += len(chunk.data)
        else:
            target = Path(args.dst)
            if target.is_dir():
                target = target / Path(path).name
            part = target.with_name(f".{target.name}.ember-part")
            try:
                with open(part, "wb") as f:
                    for chunk in stream:
                        f.write(chunk.data)
                        total += len(chunk.data)
                os.replace(part, target)  # a failed copy leaves no half file under the name
            finally:
                part.unlink(missing_ok=True)  # gone already after a successful replace
        if args.dst != "-" or args.json:
            _emit(args, {"from": args.src, "to": args.dst, "bytes": total}, f"{total} bytes from {args.src}")
        return 0
    sandbox_id, path = dst
    if path.endswith("/"):  # into a directory of the guest, under the source's name
        if args.src == "-":
            raise ClientError("copying stdin needs a file name in the sandbox, not a directory")
        path += Path(args.src).name
    if args.src == "-":
        source: Any = sys.stdin.buffer
        mode = args.mode if args.mode is not None else 0o644
    else:
        source = open(args.src, "rb")
        mode = args.mode if args.mode is not None else os.fstat(source.fileno()).st_mode & 0o7777
    with source:
        def messages() -> Iterator[Any]:
            yield c.pb2.WriteFileRequest(id=sandbox_id, path=path, mode=mode, data=source.read(UPLOAD_CHUNK))
            while data := source.read(UPLOAD_CHUNK):
                yield c.pb2.WriteFileRequest(data=data)

        resp = c.stub.WriteFile(messages(), timeout=c.deadline)
    _emit(args, {"from": args.src, "to": args.dst, "bytes": resp.bytes_written},
          f"{resp.bytes_written} bytes to {args.dst}")
    return 0


def _octal(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode") from None
    if not 0 < mode <= 0o7777:
        raise argparse.ArgumentTypeError(f"mode {text} is not in 1..7777 (octal)")
    return mode


def _exec_argv(argv: list[str]) -> list[str]:
    """ARGV as given after ID (argparse REMAINDER keeps a leading ``--``)."""
    if argv and argv[0] == "--":
        return argv[1:]
    if argv and argv[0].startswith("-"):
        raise ClientError(f"option {argv[0]} after the sandbox ID: put options before ID, "
                          "and the command after --")
    return argv


def _write(stream: Any, data: bytes) -> None:
    """Raw bytes to a text stream's buffer (a plain text stream gets them decoded)."""
    buf = getattr(stream, "buffer", None)
    stream.flush()
    if buf is None:
        stream.write(data.decode(errors="replace"))
    else:
        buf.write(data)
        buf.flush()


def _exec(args: argparse.Namespace, c: _Client) -> int:
    pb2 = c.pb2
    argv = _exec_argv(args.argv)
    if not argv:
        raise ClientError("no command: ember sandbox exec ID -- ARGV...")
    req = pb2.ExecRequest(id=args.id, argv=argv, env=_key_values(args.env, "--env"),
                          stdin=sys.stdin.buffer.read() if args.stdin else b"")
    if args.timeout is not None:
        _duration(req.timeout, args.timeout)
    # The command's own timeout bounds the call; the deadline only adds slack.
    deadline = args.deadline or (None if args.timeout is None else args.timeout + DEFAULT_DEADLINE)
    stream: Iterator[Any] = c.stub.Exec(req, timeout=deadline)
    out, err = bytearray(), bytearray()
    exit_msg = None
    try:
        for msg in stream:
            kind = msg.WhichOneof("output")
            if kind == "stdout":
                out += msg.stdout if args.json else b""
                if not args.json:
                    _write(sys.stdout, msg.stdout)
            elif kind == "stderr":
                err += msg.stderr if args.json else b""
                if not args.json:
                    _write(sys.stderr, msg.stderr)
            elif kind == "exit":
                exit_msg = msg.exit
    except KeyboardInterrupt:
        stream.cancel()  # type: ignore[attr-defined]
        return 130
    if exit_msg is None:
        raise ClientError("the exec stream ended without an exit status")
    if args.json:
        _emit(args, {"exit_code": exit_msg.exit_code, "timed_out": exit_msg.timed_out,
                     "stdout": out.decode(errors="replace"), "stderr": err.decode(errors="replace")}, "")
    if exit_msg.timed_out:
        if not args.json:
            print(f"ember: {argv[0]} timed out", file=sys.stderr)
        return EXIT_TIMED_OUT
    code = exit_msg.exit_code
    return 128 - code if code < 0 else min(code, 255)


def _template_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """The CreateTemplateRequest fields: flags, else the built guest images."""
    fields = {"kernel": args.kernel, "rootfs": args.rootfs, "initrd": args.initrd,
              "boot_args": args.boot_args}
    if args.kernel is None:
        from guest.images import ImagesNotBuilt, show
        try:
            images = show()
        except ImagesNotBuilt as exc:
            raise ClientError(f"{exc}; build them with `ember images build` or pass --kernel") from exc
        fields["kernel"] = images["kernel"]
        if args.rootfs is None and args.initrd is None:
            if images.get("rootfs"):
                fields["rootfs"] = images["rootfs"]
            else:
                fields["initrd"] = images.get("initrd")
        if args.boot_args is None:
            fields["boot_args"] = images.get("boot_args")
    for key in ("kernel", "rootfs", "initrd"):
        if fields[key]:
            fields[key] = str(Path(fields[key]).resolve())
    return {k: v or "" for k, v in fields.items()}


def cmd_template(args: argparse.Namespace, c: _Client) -> int:
    pb2 = c.pb2
    if args.template_cmd == "ls":
        resp = c.stub.ListTemplates(pb2.ListTemplatesRequest(), timeout=c.deadline)
        templates = [template_dict(pb2, t) for t in resp.templates]
        _emit(args, templates, table(
            ("NAME", "STATE", "VCPUS", "MEM MIB", "CREATED"),
            [(t["name"], t["state"], t["vcpus"], t["mem_mib"], t["created"] or "-") for t in templates]))
        return 0
    if args.template_cmd == "rm":
        c.stub.DeleteTemplate(pb2.DeleteTemplateRequest(name=args.name, tenant=args.tenant or ""),
                              timeout=c.deadline)
        _emit(args, {"name": args.name, "deleted": True}, f"deleted template {args.name}")
        return 0
    req = pb2.CreateTemplateRequest(name=args.name, vcpus=args.vcpus or 0, mem_mib=args.mem or 0,
                                    tenant=args.tenant or "", **_template_defaults(args))
    future = c.stub.CreateTemplate.future(req, timeout=c.deadline)
    done = threading.Event()
    future.add_done_callback(lambda _f: done.set())
    start = time.monotonic()
    print(f"ember: creating template {args.name} (boot, wait for the agent, snapshot)...",
          file=sys.stderr, flush=True)
    try:
        while not done.wait(PROGRESS_INTERVAL):
            print(f"ember: creating template {args.name}: {time.monotonic() - start:.0f}s",
                  file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        future.cancel()  # the service sees the cancellation and stops the boot
        return 130
    t = template_dict(pb2, future.result())
    print(f"ember: template {args.name} is {t['state']} after {time.monotonic() - start:.1f}s",
          file=sys.stderr, flush=True)
    _emit(args, t, table(("NAME", "STATE", "VCPUS", "MEM MIB", "CREATED"),
                         [(t["name"], t["state"], t["vcpus"], t["mem_mib"], t["created"] or "-")]))
    return 0


# ---- wiring ---------------------------------------------------------------------

def _run(handler: Callable[[argparse.Namespace, _Client], int]) -> Callable[[argparse.Namespace], int]:
    """``handler`` with a client, and every error as one line on stderr + status 1."""
    def func(args: argparse.Namespace) -> int:
        try:
            client = _Client(args)
        except (proto.ProtoError, AuthError) as exc:
            print(f"ember: {exc}", file=sys.stderr)
            return 1
        try:
            return handler(args, client)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            name = code.name if code is not None else "UNKNOWN"
            print(f"ember: {name}: {' '.join(str(details or '').split())}", file=sys.stderr)
            return 1
        except ClientError as exc:
            print(f"ember: {exc}", file=sys.stderr)
            return 1
        finally:
            client.close()
    return func


def _common(deadline: float | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--addr", help=f"the pool service (default: $EMBER_ADDR, else {DEFAULT_ADDR})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--deadline", type=_positive, default=deadline,
                   help="seconds the call may take (default: "
                        + (f"{deadline:g})" if deadline else "the command's --timeout plus 30, else none)"))
    p.add_argument("--tls-ca", metavar="PEM", help="speak TLS; the CA of the service's certificate "
                                                   "(default: $EMBER_TLS_CA; none: plaintext)")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate (mTLS)")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    p.add_argument("--token", help="bearer token (default: $EMBER_TOKEN, which ps does not show)")
    return p


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_parsers(sub: Any) -> None:
    """Add ``pool``, ``sandbox``, ``template``, ``status`` and ``acquire`` to ``ember``."""
    common = _common(DEFAULT_DEADLINE)

    pool = sub.add_parser("pool", help="warm pools: list, resize, drain")
    pool_sub = pool.add_subparsers(dest="pool_cmd", required=True)
    pool_sub.add_parser("ls", parents=[common], help="every pool's bounds and counts")
    s = pool_sub.add_parser("set", parents=[common], help="set a template's warm-pool bounds")
    s.add_argument("name")
    s.add_argument("--min-warm", type=_count, required=True)
    s.add_argument("--max-warm", type=_count, required=True)
    s.add_argument("--tenant", help="admin: another tenant's template")
    d = pool_sub.add_parser("drain", parents=[common], help="keep no warm sandboxes (min=max=0)")
    d.add_argument("name")
    d.add_argument("--tenant", help="admin: another tenant's template")
    pool.set_defaults(func=_run(cmd_pool))

    sb = sub.add_parser("sandbox", help="sandboxes: list, run a command, kill")
    sb_sub = sb.add_subparsers(dest="sandbox_cmd", required=True)
    ls = sb_sub.add_parser("ls", parents=[common], help="sandboxes and their leases")
    ls.add_argument("--template", help="only this template's")
    ex = sb_sub.add_parser("exec", help="run a command in a sandbox (options before ID)",
                           parents=[_common(None)])
    ex.add_argument("--env", action="append", metavar="KEY=VALUE")
    ex.add_argument("--timeout", type=_positive, help="kill the command after this many seconds")
    ex.add_argument("--stdin", action="store_true", help="send this process's stdin to the command")
    ex.add_argument("id")
    ex.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    k = sb_sub.add_parser("kill", parents=[common], help="release a sandbox (destroys it)")
    k.add_argument("id")
    cp = sb_sub.add_parser("cp", parents=[_common(600.0)],
                           help="copy a file into or out of a sandbox (ID:/path on one side)")
    cp.add_argument("--mode", type=_octal, help="permission bits of a file copied in (default: the source's)")
    cp.add_argument("src")
    cp.add_argument("dst")
    sb.set_defaults(func=_run(cmd_sandbox))

    tp = sub.add_parser("template", help="templates: create, list, remove")
    tp_sub = tp.add_subparsers(dest="template_cmd", required=True)
    c = tp_sub.add_parser("create", parents=[_common(CREATE_TEMPLATE_DEADLINE)],
                          help="boot a VM, wait for its agent, snapshot it (takes minutes)")
    c.add_argument("name")
    c.add_argument("--kernel", help="default: the built guest's")
    c.add_argument("--rootfs", help="default: the built guest's")
    c.add_argument("--initrd")
    c.add_argument("--boot-args", help="default: the built guest's")
    c.add_argument("--vcpus", type=int, help="default: the service's")
    c.add_argument("--mem", type=int, help="guest memory in MiB; default: the service's")
    c.add_argument("--tenant", help="admin: create it for another tenant")
    tp_sub.add_parser("ls", parents=[common], help="templates and their state")
    rm = tp_sub.add_parser("rm", parents=[common], help="delete a template")
    rm.add_argument("name")
    rm.add_argument("--tenant", help="admin: another tenant's template")
    tp.set_defaults(func=_run(cmd_template))

    st = sub.add_parser("status", parents=[common], help="the service at a glance: pools and counters")
    st.set_defaults(func=_run(cmd_status))

    ac = sub.add_parser("acquire", parents=[common], help="lease a sandbox (release it with sandbox kill)")
    ac.add_argument("template")
    ac.add_argument("--ttl", type=_positive, help="lease seconds (default: the service's)")
    ac.add_argument("--meta", action="append", metavar="KEY=VALUE", help="metadata for the guest")
    ac.add_argument("--idempotency-key", help="a retry with the same key gets the same sandbox")
    ac.set_defaults(func=_run(cmd_acquire))

    bn = sub.add_parser("bench", help="benchmarks against a running service")
    bn_sub = bn.add_subparsers(dest="bench_cmd", required=True)
    ld = bn_sub.add_parser("load", help="Acquire -> agent ping -> Release at a rate or flat out (bench/load.py)")
    _add_load_arguments(ld)
    ld.set_defaults(func=cmd_bench_load)


def _add_load_arguments(p: argparse.ArgumentParser) -> None:
    try:
        from bench.load import add_arguments
    except ImportError:  # an installed CLI without the repository's bench/: forward everything
        p.add_argument("load_args", nargs=argparse.REMAINDER)
        return
    add_arguments(p)


def cmd_bench_load(args: argparse.Namespace) -> int:
    """`ember bench load`: bench/load.py's harness (the bench package ships with the repository)."""
    try:
        from bench.load import main_args
    except ImportError:
        print("ember: bench load needs the Ember repository's bench/ package on the path", file=sys.stderr)
        return 1
    return main_args(args)
