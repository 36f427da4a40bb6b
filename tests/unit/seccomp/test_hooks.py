"""How the VMM's threads and flags use the filters: fail closed, name threads, refuse bad flags."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmm import seccomp
from vmm.api.handler import Reply
from vmm.api.server import ApiServer, ApiServerError
from vmm.metrics import PeriodicFlush

ROOT = Path(__file__).resolve().parents[3]


def _comm(tid: int) -> str:
    return Path(f"/proc/self/task/{tid}/comm").read_text().rstrip("\n")


def test_without_configure_a_thread_is_only_named() -> None:
    assert seccomp.active_filters() is None
    seen: dict[str, object] = {}

    def body() -> None:
        seen["installed"] = seccomp.enter_thread(seccomp.Role.VCPU, "fc_vcpu 7 with a long name")
        seen["comm"] = _comm(threading.get_native_id())

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == {"installed": False, "comm": "fc_vcpu 7 with "}  # 15 bytes: TASK_COMM_LEN - 1


@pytest.fixture
def failing_install(monkeypatch: pytest.MonkeyPatch) -> list[seccomp.Role]:
    roles: list[seccomp.Role] = []

    def refuse(role: seccomp.Role, name: str) -> bool:
        roles.append(role)
        raise seccomp.FilterInstallError("seccomp(SECCOMP_SET_MODE_FILTER): Invalid argument")
    monkeypatch.setattr(seccomp, "enter_thread", refuse)
    return roles


def test_an_api_thread_that_cannot_install_its_filter_serves_nothing(tmp_path: Path, failing_install) -> None:
    sock = tmp_path / "api.sock"
    server = ApiServer(str(sock), lambda method, path, body: Reply(200, {}))
    with pytest.raises(ApiServerError, match="cannot install its seccomp filter: .*Invalid argument"):
        server.start()
    assert failing_install == [seccomp.Role.API]
    assert not sock.exists()


def test_a_metrics_thread_that_cannot_install_its_filter_never_flushes(failing_install) -> None:
    flushes: list[int] = []
    flusher = PeriodicFlush(lambda: flushes.append(1), lambda fn: fn(), period=0.01)
    flusher.start()
    time.sleep(0.1)
    flusher.stop()
    assert failing_install == [seccomp.Role.VMM] and flushes == [] and flusher.ticks == 0


def _vmm_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmm.main", "--no-api", "--config-file", "/nonexistent.json",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_no_seccomp_and_a_filter_file_exclude_each_other(tmp_path: Path) -> None:
    proc = _vmm_main("--no-seccomp", "--seccomp-filter", str(tmp_path / "f.json"))
    assert proc.returncode == 2 and "not allowed with argument --no-seccomp" in proc.stderr


@pytest.mark.parametrize("content,message", [
    (None, "cannot read"),
    ("{", "is not JSON"),
    (json.dumps({"vmm": {}, "api": {}, "vcpu": {}}), "api: missing default_action, filter, filter_action"),
    (json.dumps({r: {"default_action": "kill_process", "filter_action": "allow", "filter": [{"syscall": "reed"}]}
                 for r in ("vmm", "api", "vcpu")}), "unknown syscall 'reed'"),
])
def test_a_bad_filter_file_is_a_startup_error(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "filters.json"
    if content is not None:
        path.write_text(content)
    proc = _vmm_main("--seccomp-filter", str(path))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("ember-vmm: error: cannot use the seccomp filters: ") and message in proc.stderr


def test_the_builtin_filters_print_as_a_filter_file(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "vmm.seccomp"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    path = tmp_path / "builtin.json"
    path.write_text(out)
    assert seccomp.read_filter_file(str(path)) == seccomp.builtin_filters()
    summary = subprocess.run([sys.executable, "-m", "vmm.seccomp", "--summary"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, check=True).stdout
    assert [line.split()[0] for line in summary.splitlines()] == ["api", "vmm", "vcpu"]
