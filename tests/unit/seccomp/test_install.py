"""Installing filters for real, in child processes: what is allowed runs, what is not kills the process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

# Runs `body` on a thread that installed `role`'s built-in filter (or `--custom` JSON), then prints the
# Seccomp lines of every thread's /proc status as JSON.
PRELUDE = textwrap.dedent("""
    import fcntl, json, mmap, os, socket, sys, termios, threading, traceback  # a filtered thread cannot import
    from vmm import seccomp

    seccomp.configure(seccomp.ThreadFilters.compile(seccomp.builtin_filters(), "test"))
    status = {}

    def seccomp_status(tid):
        lines = open(f"/proc/self/task/{tid}/status").read().splitlines()
        keep = ("Name", "Seccomp", "Seccomp_filters")
        return {k: v.strip() for k, v in (l.split(":", 1) for l in lines) if k in keep}

    def thread_main():
        tid = threading.get_native_id()  # gettid: not in any allowlist
        seccomp.enter_thread(seccomp.Role[sys.argv[1]], "fc_test")
        status["filtered"] = seccomp_status(tid)
        print("installed", flush=True)
        BODY

    t = threading.Thread(target=thread_main)
    t.start()
    t.join()
    status["main"] = seccomp_status(os.getpid())
    print(json.dumps(status), flush=True)
""")


def run_filtered(role: str, body: str) -> subprocess.CompletedProcess:
    code = PRELUDE.replace("BODY", textwrap.indent(textwrap.dedent(body), "    ").strip())
    return subprocess.run([sys.executable, "-c", code, role], cwd=ROOT, capture_output=True, text=True, timeout=60)


def assert_killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -signal.SIGSYS, (proc.returncode, proc.stdout, proc.stderr)
    assert "installed" in proc.stdout  # killed by the filter, not before it


def test_a_thread_runs_under_its_filter_and_the_others_do_not() -> None:
    proc = run_filtered("VCPU", """
        data = [bytearray(200_000) for _ in range(50)]  # malloc, pymalloc arenas
        sys.stdout.write("still here\\n")
        try:
            raise ValueError("boom")
        except ValueError:
            traceback.print_exc()  # reads this file's source: the read-only error-report rules
    """)
    assert proc.returncode == 0, proc.stderr
    assert "still here" in proc.stdout and "ValueError: boom" in proc.stderr
    status = json.loads(proc.stdout.splitlines()[-1])
    assert status["filtered"] == {"Name": "fc_test", "Seccomp": "2", "Seccomp_filters": "1"}
    assert status["main"]["Seccomp"] == "0"  # no TSYNC: the filter is the installing thread's alone


@pytest.mark.parametrize("role,body", [
    ("VCPU", "os.getppid()"),
    ("API", "os.getppid()"),
    ("VMM", "os.getppid()"),
    ("VMM", "socket.socket(socket.AF_INET, socket.SOCK_STREAM)"),
    ("API", "socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)"),
    ("VCPU", "mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_EXEC)"),
    ("VCPU", "mmap.mmap(-1, 4096)"),  # MAP_SHARED
    ("VCPU", "open('/tmp/ember-seccomp-never-written', 'w')"),
    ("API", "fcntl.ioctl(1, termios.TIOCGWINSZ, b'\\0' * 8)"),
    ("VMM", "threading.Thread(target=print).start()"),  # a filtered thread cannot start threads
    ("VMM", "os.kill(os.getpid(), 0)"),
])
def test_anything_else_kills_the_process(role: str, body: str) -> None:
    assert_killed(run_filtered(role, body))


def test_allowed_arguments_pass() -> None:
    proc = run_filtered("VMM", """
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        s.close()
        m = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE)  # anonymous shared memory is not allowed
        m[0] = 1
        m.close()
    """)
    assert proc.returncode == 0, proc.stderr


def test_a_thread_started_after_a_filter_inherits_it_and_stacks_its_own() -> None:
    """Why the VMM installs the main thread's filter only once the vCPU threads exist."""
    code = textwrap.dedent("""
        import json, threading
        from vmm import seccomp

        # Ember's filters plus what starting a thread and installing a filter take.
        extra = tuple(seccomp.Rule(n) for n in ("clone3", "rseq", "set_robust_list", "prctl", "seccomp", "gettid"))
        seccomp.configure(seccomp.ThreadFilters.compile(
            {r: seccomp.Filter(f.rules + extra) for r, f in seccomp.builtin_filters().items()}, "test"))

        def count(tid):
            status = open(f"/proc/self/task/{tid}/status").read()
            return status.split("Seccomp_filters:")[1].split()[0]

        out = {}
        tids = []
        def child():
            out["inherited"] = count(tids[0])
            seccomp.install_thread_filter(seccomp.Role.VCPU)
            out["stacked"] = count(tids[0])

        threading.Thread(target=int).start()  # glibc installs its thread signal handlers (rt_sigaction) once
        seccomp.install_thread_filter(seccomp.Role.VMM)
        t = threading.Thread(target=lambda: (tids.append(threading.get_native_id()), child()))
        t.start()
        t.join()
        print(json.dumps(out), flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"inherited": "1", "stacked": "2"}
