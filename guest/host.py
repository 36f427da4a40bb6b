"""Host-side tools for image builds: Debian packages and logged commands.

Everything that touches the build host's package manager or runs a
long-lived command lives here, so the rest of the package is plain steps.
Only Debian's archive (through apt-get) is used; nothing is downloaded
from anywhere else.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .errors import GuestImageError

__all__ = [
    "HostToolError",
    "CommandFailed",
    "PackagesUnavailable",
    "Progress",
    "installed_version",
    "missing_packages",
    "ensure_packages",
    "run_checked",
    "run_logged",
]

Progress = Callable[[str], None]

# How often a long command reports that it is still running.
HEARTBEAT_SECONDS = 20.0
# Lines of a failed command's output quoted in its error.
FAILURE_TAIL_LINES = 25


class HostToolError(GuestImageError):
    """A host tool needed for the guest images failed."""


class CommandFailed(HostToolError):
    """A build command exited with an error."""


class PackagesUnavailable(HostToolError):
    """Debian packages needed to build the guest images could not be installed."""


def installed_version(package: str) -> str | None:
    """The installed version of a Debian package, or None if it is not installed."""
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Status} ${Version}", package],
        capture_output=True, text=True, check=False,
    )
    status, _, version = result.stdout.strip().partition(" ")
    if result.returncode != 0 or status != "installed" or not version:
        return None
    return version


def missing_packages(packages: Sequence[str]) -> list[str]:
    return [p for p in packages if installed_version(p) is None]


def ensure_packages(packages: Sequence[str], progress: Progress) -> None:
    """Install whichever of ``packages`` are missing, with apt-get.

    ``apt-get update`` runs only when the install fails (empty or stale
    package lists), and then the install is tried once more.
    """
    missing = missing_packages(packages)
    if not missing:
        return
    if os.geteuid() != 0:
        raise PackagesUnavailable(
            f"missing {' '.join(missing)}; run as root: apt-get install -y {' '.join(missing)}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    progress(f"apt: installing {' '.join(missing)}")
    first = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
    if first.returncode != 0:
        progress("apt: install failed, running apt-get update and retrying")
        update = subprocess.run(
            ["apt-get", "update", "-q"], capture_output=True, text=True, env=env, check=False
        )
        second = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
        if second.returncode != 0:
            tail = "\n".join((update.stdout + second.stdout + second.stderr).splitlines()[-FAILURE_TAIL_LINES:])
            raise PackagesUnavailable(f"apt-get install {' '.join(missing)} failed:\n{tail}")
    still = missing_packages(missing)
    if still:
        raise PackagesUnavailable(f"still missing after apt-get install: {' '.join(still)}")


def run_checked(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    input_data: bytes | None = None,
) -> str:
    """Run a short command; return its stdout, or raise CommandFailed with its output."""
    result = subprocess.run(
        [os.fspath(c) for c in cmd], cwd=cwd, env=None if env is None else dict(env),
        input=input_data, capture_output=True, check=False,
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace")
        tail = "\n".join(output.splitlines()[-FAILURE_TAIL_LINES:])
        raise CommandFailed(f"{' '.join(map(os.fspath, cmd))} exited {result.returncode}:\n{tail}")
    return result.stdout.decode(errors="replace")


def run_logged(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    log_path: Path,
    label: str,
    progress: Progress,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    heartbeat: float = HEARTBEAT_SECONDS,
) -> float:
    """Run a long command, appending its output to ``log_path``.

    Every ``heartbeat`` seconds (checked as output arrives) a one-line
    progress report is made: elapsed time, lines so far, the latest line.
    Returns the elapsed seconds; raises CommandFailed quoting the log's
    tail on a non-zero exit.
    """
    argv = [os.fspath(c) for c in cmd]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=FAILURE_TAIL_LINES)
    start = last_report = time.monotonic()
    lines = 0
    with open(log_path, "a", encoding="utf-8", errors="replace") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        with subprocess.Popen(
            argv, cwd=cwd, env=None if env is None else dict(env),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, errors="replace", bufsize=1,
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                lines += 1
                tail.append(line.rstrip())
                now = time.monotonic()
                if now - last_report >= heartbeat:
                    last_report = now
                    progress(f"{label}: {now - start:.0f}s, {lines} lines, {line.strip()[:70]}")
            code = proc.wait()
    elapsed = time.monotonic() - start
    if code != 0:
        quoted = "\n".join(tail)
        raise CommandFailed(f"{label}: {' '.join(argv)} exited {code} (log: {log_path}):\n{quoted}")
    return elapsed
