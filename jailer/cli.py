"""`ember-jailer` (``python -m jailer``): start a VMM in a jail, with Firecracker's jailer flags.

    ember-jailer --id vm1 --exec-file /usr/local/bin/ember-vmm --uid 123 --gid 100 \\
        [--chroot-base-dir /srv/jailer] [--netns /var/run/netns/ns1] \\
        [--cgroup memory.limit_in_bytes=536870912 ...] [--cgroup-version 1|2] [--parent-cgroup P] \\
        [--resource-limit no-file=1024 ...] [--new-pid-ns] [--daemonize] \\
        -- --api-sock /api.sock --id vm1

What it does, in order (docs: Firecracker's docs/jailer.md, adapted):

1. builds ``<chroot-base-dir>/<exec-file name>/<id>/root`` (it may already
   exist and hold files put there beforehand, e.g. hard links of drives):
   owned by uid/gid, with ``/dev/kvm``, ``/dev/net/tun``,
   ``/dev/userfaultfd``; creates the cgroup ``<parent-cgroup>/<id>`` with
   the ``--cgroup`` settings; writes the jail spec to
   ``<chroot-base-dir>/<exec-file name>/<id>/jail.json`` (outside the chroot);
2. ``--daemonize``: a new session, stdin/stdout/stderr on /dev/null;
3. ``--new-pid-ns``: forks into a new PID namespace (the VMM is its pid 1);
4. writes the VMM's pid to ``<chroot>/<exec-file name>.pid`` and execs
   ``<exec-file> [--exec-arg ...] --jail <jail.json> <VMM args>``.

Unlike Firecracker's, this jailer does not chroot itself before exec: the
VMM (a Python program) enters the jail itself, after it has imported
everything it needs (`jailer.enter`). Paths given to the VMM (API socket,
drives, snapshots) are paths inside the chroot, as with Firecracker.
Without ``--daemonize``, in a new PID namespace, the jailer stays as the
VMM's parent, passes SIGTERM/SIGINT/SIGHUP on and exits with its status
(Firecracker's exits at once; with ``--daemonize`` this one does too).

Ember additions: ``--exec-arg`` (arguments before ``--jail``, e.g.
``--exec-file python3 --exec-arg=-m --exec-arg=vmm.main``), ``--hard-link
HOST:JAIL`` and ``--bind HOST:JAIL[:rw]`` (files made visible in the jail),
and ``--cleanup`` (remove the jail of ``--id``: chroot, spec, cgroup).

Exit status: the VMM's (or 0 when daemonized), 1 when the jail cannot be
built, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys

from jailer.jail import JailError, cleanup, fork_into_new_pid_ns, prepare
from jailer.spec import DEFAULT_RLIMITS, RLIMITS, BindMount, CgroupSpec, HardLink, JailSpec, SpecError, chroot_dir

__all__ = ["main", "run", "build_parser", "spec_from_args", "SPEC_FILE", "JAIL_FLAG"]

DEFAULT_CHROOT_BASE = "/srv/jailer"
#: The spec file, beside the chroot (``<base>/<exec>/<id>/jail.json``).
SPEC_FILE = "jail.json"
#: The VMM flag that names the spec file.
JAIL_FLAG = "--jail"


def _key_value(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key or not value:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE")
    return key, value


def _resource_limit(text: str) -> tuple[str, int]:
    key, value = _key_value(text)
    if key not in RLIMITS:
        raise argparse.ArgumentTypeError(f"unknown resource {key!r}: expected one of {', '.join(RLIMITS)}")
    try:
        return key, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the limit must be an integer") from None


def _pair(text: str) -> tuple[str, str, bool]:
    parts = text.split(":")
    if len(parts) == 2:
        return parts[0], parts[1], True
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        return parts[0], parts[1], parts[2] == "ro"
    raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:JAIL[:ro|rw]")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ember-jailer", description="Start a VMM in a jail (Firecracker's jailer flags).")
    p.add_argument("--id", required=True, help="the microVM id (also the jail's hostname)")
    p.add_argument("--exec-file", required=True, metavar="PATH", help="the VMM to run")
    p.add_argument("--uid", type=int, required=True, help="the VMM's user id (not 0)")
    p.add_argument("--gid", type=int, required=True, help="the VMM's group id (not 0)")
    p.add_argument("--chroot-base-dir", default=DEFAULT_CHROOT_BASE, metavar="DIR",
                   help="base of the chroot directories (default: %(default)s)")
    p.add_argument("--netns", metavar="PATH", help="network namespace to join (e.g. /var/run/netns/NAME)")
    p.add_argument("--cgroup", type=_key_value, action="append", default=[], metavar="FILE=VALUE",
                   help="a cgroup setting, e.g. memory.limit_in_bytes=536870912 (repeatable)")
    p.add_argument("--cgroup-version", type=int, choices=(1, 2), help="cgroup version (default: detected)")
    p.add_argument("--parent-cgroup", metavar="PATH", help="parent of the jail's cgroup (default: exec file name)")
    p.add_argument("--resource-limit", type=_resource_limit, action="append", default=[], metavar="NAME=VALUE",
                   help=f"rlimit: {', '.join(RLIMITS)} (repeatable; default no-file=2048)")
    p.add_argument("--new-pid-ns", action="store_true", help="run the VMM as pid 1 of a new PID namespace")
    p.add_argument("--daemonize", action="store_true", help="new session, stdio on /dev/null; exit at once")
    p.add_argument("--exec-arg", action="append", default=[], metavar="ARG", help="(Ember) argument before --jail")
    p.add_argument("--hard-link", type=_pair, action="append", default=[], metavar="HOST:JAIL",
                   help="(Ember) hard-link a host file into the jail")
    p.add_argument("--bind", type=_pair, action="append", default=[], metavar="HOST:JAIL[:rw]",
                   help="(Ember) bind-mount a host file or directory in the jail (read-only unless :rw)")
    p.add_argument("--cleanup", action="store_true", help="(Ember) remove the jail of --id and exit")
    p.add_argument("vmm_args", nargs=argparse.REMAINDER, help="-- then the VMM's own arguments")
    return p


def spec_from_args(args: argparse.Namespace) -> JailSpec:
    """The `JailSpec` the flags describe; `SpecError` if they are inconsistent."""
    exec_name = os.path.basename(args.exec_file)
    cgroup = None
    if args.cgroup:
        parent = (args.parent_cgroup or exec_name).strip("/")
        cgroup = CgroupSpec(path=f"{parent}/{args.id}", settings=tuple(args.cgroup), version=args.cgroup_version or 0)
    limits = dict(DEFAULT_RLIMITS)
    limits.update(dict(args.resource_limit))
    return JailSpec(
        id=args.id, chroot=chroot_dir(os.path.abspath(args.chroot_base_dir), args.exec_file, args.id),
        uid=args.uid, gid=args.gid, netns=args.netns, cgroup=cgroup, rlimits=tuple(limits.items()),
        new_pid_ns=args.new_pid_ns,
        links=tuple(HardLink(os.path.abspath(h), j) for h, j, _ in args.hard_link),
        binds=tuple(BindMount(os.path.abspath(h), j, ro) for h, j, ro in args.bind))


def _daemonize() -> None:
    if os.getpid() == os.getpgrp():
        # SAFETY: the jailer is single-threaded; the parent only exits.
        if os.fork() != 0:
            os._exit(0)
    os.setsid()
    fd = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    if fd > 2:
        os.close(fd)


def _write_pid(spec: JailSpec, exec_name: str, pid: int) -> None:
    path = os.path.join(spec.chroot, f"{exec_name}.pid")
    with open(path, "w") as f:
        f.write(f"{pid}\n")


def _exec(argv: list[str]) -> None:
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        print(f"ember-jailer: cannot exec {argv[0]}: {exc}", file=sys.stderr)
        os._exit(127)


def _wait_forwarding(pid: int) -> int:
    """Wait for `pid`, passing SIGTERM/SIGINT/SIGHUP on; its exit status (128 + signal if killed)."""
    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    return os.waitstatus_to_exitcode(status) if not os.WIFSIGNALED(status) else 128 + os.WTERMSIG(status)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    vmm_args = list(args.vmm_args)
    if vmm_args[:1] == ["--"]:
        vmm_args = vmm_args[1:]
    try:
        spec = spec_from_args(args)
    except SpecError as exc:
        print(f"ember-jailer: {exc}", file=sys.stderr)
        return 2
    exec_name = os.path.basename(args.exec_file)
    jail_dir = os.path.dirname(spec.chroot)
    spec_path = os.path.join(jail_dir, SPEC_FILE)
    try:
        if args.cleanup:
            try:
                with open(spec_path) as f:
                    spec = JailSpec.from_json(json.load(f))
            except FileNotFoundError:
                pass
            cleanup(spec)
            shutil.rmtree(jail_dir, ignore_errors=True)
            return 0
        if not os.path.isfile(args.exec_file) or not os.access(args.exec_file, os.X_OK):
            print(f"ember-jailer: {args.exec_file} is not an executable file", file=sys.stderr)
            return 2
        prepare(spec, exist_ok=True)
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(spec.to_json(), f, indent=2)
    except (JailError, SpecError, OSError, ValueError) as exc:
        print(f"ember-jailer: {exc}", file=sys.stderr)
        return 1
    command = [os.path.abspath(args.exec_file), *args.exec_arg, JAIL_FLAG, spec_path, *vmm_args]
    sys.stdout.flush()
    sys.stderr.flush()
    if args.daemonize:
        _daemonize()
    if not args.new_pid_ns:
        _write_pid(spec, exec_name, os.getpid())
        _exec(command)
    try:
        pid = fork_into_new_pid_ns()
    except (JailError, OSError) as exc:
        print(f"ember-jailer: {exc}", file=sys.stderr)
        return 1
    if pid == 0:
        _exec(command)
    _write_pid(spec, exec_name, pid)
    if args.daemonize:
        return 0
    return _wait_forwarding(pid)


def run() -> None:
    sys.exit(main())
