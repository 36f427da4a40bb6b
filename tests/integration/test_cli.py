"""The `ember` and `ember-vmm` command lines, on real KVM with the test guest."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kvm


def _ember(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "poolsvc.cli", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def test_ember_run_boots_a_kernel_with_console_on_stdout(testguest) -> None:
    p = _ember("run", "--kernel", str(testguest), "--cmdline", "mode=smp", "--vcpus", "2", "--mem", "256")
    assert p.returncode == 0, p.stderr
    assert "TESTGUEST smp PASS" in p.stdout
    assert "CPUS 2" in p.stdout


def test_ember_run_reports_a_missing_kernel(tmp_path) -> None:
    p = _ember("run", "--kernel", str(tmp_path / "nope"), "--cmdline", "x")
    assert p.returncode != 0
    assert "nope" in p.stderr and "Traceback" not in p.stderr


def test_vmm_version() -> None:
    p = subprocess.run([sys.executable, "-m", "vmm.main", "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("ember-vmm v")


@pytest.mark.parametrize("config,needle", [
    ({"machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}, "boot-source"),
    ({"boot-source": {"kernel_image_path": "/x"}, "machine-config": {"vcpu_count": 0, "mem_size_mib": 128}},
     "vCPUs"),
    ({"boot-source": {"kernel_image_path": "/x", "bogus": 1}}, "bogus"),
])
def test_vmm_rejects_bad_config_files(tmp_path, config, needle) -> None:
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps(config))
    p = subprocess.run([sys.executable, "-m", "vmm.main", "--no-api", "--config-file", str(cfg)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_vmm_reports_a_device_it_cannot_set_up(tmp_path, testguest) -> None:
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps({
        "boot-source": {"kernel_image_path": str(testguest), "boot_args": "mode=hello"},
        "vsock": {"guest_cid": 3, "uds_path": str(tmp_path / "no-such-dir" / "v.sock")},
    }))
    p = subprocess.run([sys.executable, "-m", "vmm.main", "--no-api", "--config-file", str(cfg)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "vsock" in p.stderr and "Traceback" not in p.stderr, p.stderr
