"""Ember's API against the shared contract (firecracker-api-v1.17.yaml), on real `ember-vmm` processes.

Every operation of the contract is exercised (`test_the_steps_cover_every_operation_of_the_contract`
checks the tables below cover them all); each answer's status must be one
the contract declares for the operation (an error may fall under
``default``) and its body must validate against the declared schema
(jsonschema, draft 4 as Swagger 2.0 uses; null members are dropped first, see
conftest.strip_nulls). Endpoints of features Ember lacks must answer 400
naming the feature. Then Firecracker's getting-started flow, with curl,
exactly as its docs run it.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.kvm

# What InstanceStart may name when it refuses devices the builder cannot make yet.
DEVICE_WORDS = ("drive", "network", "vsock", "entropy", "tap", "rootfs", "net1")


@dataclass(frozen=True)
class Step:
    """One request and what must come back."""

    method: str
    path: str
    body: Any = None
    expect: int | tuple[int, ...] = 204
    fault: str | None = None  # a piece of the fault_message (4xx)
    valid_request: bool = True  # the body is valid per the contract (checked before sending)

    @property
    def statuses(self) -> tuple[int, ...]:
        return self.expect if isinstance(self.expect, tuple) else (self.expect,)

    def __str__(self) -> str:
        return f"{self.method} {self.path} {json.dumps(self.body)[:120] if self.body is not None else ''}"


def pre_boot_steps(kernel: str, files: Path) -> list[Step]:
    return [
        Step("GET", "/", expect=200),
        Step("GET", "/version", expect=200),
        Step("GET", "/machine-config", expect=200),
        Step("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "smt": False,
                                        "track_dirty_pages": False, "huge_pages": "None"}),
        Step("PATCH", "/machine-config", {"mem_size_mib": 256}, valid_request=False),  # partial by design
        Step("PUT", "/boot-source", {"kernel_image_path": kernel, "boot_args": "mode=echo"}),
        Step("PUT", "/logger", {"log_path": str(files / "log"), "level": "Info", "show_level": True,
                                "show_log_origin": True}),
        Step("PUT", "/metrics", {"metrics_path": str(files / "metrics"), "emit_id": True,
                                 "properties": {"pool": "conformance"}}),
        Step("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": str(files / "rootfs.ext4"),
                                       "is_root_device": True, "is_read_only": False}),
        Step("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0",
                                                 "guest_mac": "06:00:AC:10:00:02"}),
        Step("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(files / "v.sock")}),
        Step("PUT", "/entropy", {}),
        Step("PUT", "/mmds/config", {"network_interfaces": ["eth0"], "version": "V2"}),
        Step("PUT", "/mmds", {"latest": {"meta-data": {"instance-id": "i-1"}}}),
        Step("PATCH", "/mmds", {"latest": {"meta-data": {"zone": "z1"}}}),
        Step("GET", "/mmds", expect=200),
        Step("GET", "/vm/config", expect=200),
        # Post-boot-only actions, before boot.
        Step("PATCH", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/x"}, 400, "before starting"),
        Step("PATCH", "/network-interfaces/eth0", {"iface_id": "eth0"}, 400, "before starting"),
        Step("PATCH", "/vm", {"state": "Paused"}, 400, "before starting"),
        Step("PUT", "/actions", {"action_type": "FlushMetrics"}, 400, "before starting"),
        Step("PUT", "/actions", {"action_type": "SendCtrlAltDel"}, 400, "before starting"),
    ]


UNSUPPORTED_STEPS = [
    Step("PUT", "/balloon", {"amount_mib": 16, "deflate_on_oom": True}, 400, "balloon"),
    Step("PATCH", "/balloon", {"amount_mib": 8}, 400, "balloon"),
    Step("GET", "/balloon", expect=400, fault="balloon"),
    Step("GET", "/balloon/statistics", expect=400, fault="balloon"),
    Step("PATCH", "/balloon/statistics", {"stats_polling_interval_s": 1}, 400, "balloon"),
    Step("PATCH", "/balloon/hinting/start", {"acknowledge_on_stop": True}, 400, "balloon"),
    Step("GET", "/balloon/hinting/status", expect=400, fault="balloon"),
    Step("PATCH", "/balloon/hinting/stop", expect=400, fault="balloon"),
    Step("PUT", "/cpu-config", {"cpuid_modifiers": []}, 400, "CPU templates"),
    Step("PUT", "/serial", {"serial_out_path": "/s"}, 400, "serial"),
    Step("PUT", "/hotplug/memory", {"total_size_mib": 1024}, 400, "Memory hotplug"),
    Step("PATCH", "/hotplug/memory", {"requested_size_mib": 512}, 400, "Memory hotplug"),
    Step("GET", "/hotplug/memory", expect=400, fault="Memory hotplug"),
    Step("PUT", "/pmem/p0", {"id": "p0", "path_on_host": "/p"}, 400, "pmem"),
    Step("PATCH", "/pmem/p0", {"id": "p0"}, 400, "pmem"),
]

NEGATIVE_STEPS = [
    Step("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "foo": 1}, 400, "unknown field `foo`",
         valid_request=False),
    Step("PUT", "/machine-config", {"vcpu_count": "two", "mem_size_mib": 128}, 400,
         "vcpu_count: invalid type: string \"two\", expected u8", valid_request=False),
    Step("PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 128}, 400, "The number of vCPUs must be",
         valid_request=False),
    Step("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 128}, 400, "The number of vCPUs must be",
         valid_request=False),
    Step("PATCH", "/machine-config", {"vcpu_count": 33}, 400, "The number of vCPUs must be", valid_request=False),
    Step("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 0}, 400, "The memory size (MiB) is either 0"),
    Step("PATCH", "/machine-config", {}, 400, "Empty PATCH request.", valid_request=False),
    Step("PUT", "/boot-source", {"kernel_image_path": "/no/such/vmlinux"}, 400, "kernel file cannot be opened"),
    Step("PUT", "/boot-source", {"kernel_image_path": "/k", "initrd": "/i"}, 400, "unknown field `initrd`"),
    Step("PUT", "/drives/rootfs", {"drive_id": "other", "is_root_device": True, "path_on_host": "/r"}, 400,
         "does not match the id from the body"),
    Step("PUT", "/drives/root-fs", {"drive_id": "root-fs", "is_root_device": True, "path_on_host": "/r"}, 400,
         "alphanumeric characters and underscores"),
    Step("PUT", "/drives/second_root", {"drive_id": "second_root", "is_root_device": True, "path_on_host": "/r"},
         400, "A root block device already exists!"),
    Step("PUT", "/vsock", {"guest_cid": 2, "uds_path": "/v"}, 400, "Invalid guest CID", valid_request=False),
    Step("PUT", "/mmds/config", {"network_interfaces": ["nope"]}, 400, "does not correspond to any existing"),
    Step("PUT", "/actions", {"action_type": "Reboot"}, 400, "unknown variant `Reboot`", valid_request=False),
    Step("PUT", "/actions", b'{"action_type": ', 400, "Invalid JSON", valid_request=False),
    Step("PUT", "/metrics", {"metrics_path": "/again"}, 400, "Reinitialization of metrics not allowed."),
    Step("PUT", "/mmds", {"big": "x" * 60_000}, 400, "is larger than the limit of 51200", valid_request=False),
    # Snapshots: parsed by the API, refused here by state (before boot, after configuring resources).
    Step("PUT", "/snapshot/create", {"mem_file_path": "/m", "snapshot_path": "/s"}, 400, "not supported before"),
    Step("PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_file_path": "/m"}, 400,
         "not allowed after configuring boot-specific resources"),
    Step("PUT", "/snapshot/load", {"snapshot_path": "/s"}, 400,
         "either `mem_backend` or `mem_file_path` is required"),
    Step("PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"},
                                   "huge_pages": "2M"}, 400, "not supported by Ember"),
    Step("PUT", "/snapshot/create", {"mem_file_path": "/m", "snapshot_path": "/s", "snapshot_type": "Incremental"},
         400, "unknown variant `Incremental`", valid_request=False),
]


def post_boot_steps(kernel: str, files: Path) -> list[Step]:
    return [
        Step("GET", "/", expect=200),
        Step("PATCH", "/vm", {"state": "Paused"}),
        Step("GET", "/", expect=200),
        Step("PATCH", "/vm", {"state": "Resumed"}),
        Step("PUT", "/actions", {"action_type": "FlushMetrics"}),
        Step("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
        Step("GET", "/machine-config", expect=200),
        Step("GET", "/vm/config", expect=200),
        Step("GET", "/version", expect=200),
        Step("PUT", "/mmds", {"k": "v"}),
        Step("PATCH", "/mmds", {"k2": {"a": 1}}),
        Step("GET", "/mmds", expect=200),
        Step("PUT", "/mmds", {"big": "x" * 40_000}, expect=204),
        Step("PATCH", "/mmds", {"big2": "x" * 40_000}, 413, "MMDS limit exceeded error"),
        # Pre-boot-only actions, after boot.
        Step("PUT", "/actions", {"action_type": "InstanceStart"}, 400, "after starting"),
        Step("PUT", "/boot-source", {"kernel_image_path": kernel}, 400, "after starting"),
        Step("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 128}, 400, "after starting"),
        Step("PATCH", "/machine-config", {"vcpu_count": 2}, 400, "after starting", valid_request=False),
        Step("PUT", "/logger", {"level": "Debug"}, 400, "after starting"),
        Step("PUT", "/metrics", {"metrics_path": str(files / "m2")}, 400, "after starting"),
        Step("PUT", "/drives/d1", {"drive_id": "d1", "is_root_device": False, "path_on_host": "/d"}, 400,
             "after starting"),
        Step("PUT", "/network-interfaces/n1", {"iface_id": "n1", "host_dev_name": "tap1"}, 400, "after starting"),
        Step("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/v"}, 400, "after starting"),
        Step("PUT", "/entropy", {}, 400, "after starting"),
        Step("PUT", "/mmds/config", {"network_interfaces": []}, 400, "after starting"),
        Step("PATCH", "/drives/d1", {"drive_id": "d1", "path_on_host": "/x"}, 400, "Invalid block device ID"),
        Step("PATCH", "/network-interfaces/n1", {"iface_id": "n1"}, 400, "Invalid network interface ID"),
        Step("PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_backend": {"backend_type": "File",
                                                                               "backend_path": "/m"}},
             400, "after starting"),
        Step("PUT", "/snapshot/create", {"mem_file_path": str(files / "mem"), "snapshot_path": str(files / "vm")},
             400, "paused"),
    ]


def run_steps(proc, validator, steps: list[Step]) -> list:
    answers = []
    for step in steps:
        if step.valid_request and step.body is not None and not isinstance(step.body, bytes):
            validator.check_request(step.method, step.path, step.body)
        resp = proc.api.request(step.method, step.path, step.body)
        assert resp.status in step.statuses, f"{step}: got {resp}\n{proc.describe()}"
        validator.check_response(step.method, step.path, resp.status, resp.body)
        if step.fault is not None:
            assert step.fault in resp.fault, f"{step}: {resp.fault}"
        if resp.status >= 400:
            # Every refusal leaves the VMM serving.
            alive = proc.api.get("/")
            assert alive.status == 200, f"after {step}: {alive}\n{proc.describe()}"
        answers.append(resp)
    return answers


def test_the_steps_cover_every_operation_of_the_contract(validator, tmp_path) -> None:
    steps = (pre_boot_steps("/k", tmp_path) + UNSUPPORTED_STEPS + NEGATIVE_STEPS
             + post_boot_steps("/k", tmp_path) + [Step("PUT", "/actions", {"action_type": "InstanceStart"})])
    covered = {(s.method, validator.template(s.path)) for s in steps}
    assert set(validator.operations) - covered == set()


def test_before_boot_every_endpoint_answers_per_the_contract(vmm_process, validator, testguest, tmp_path) -> None:
    (tmp_path / "rootfs.ext4").write_bytes(b"\0" * 4096)
    proc = vmm_process()
    answers = run_steps(proc, validator, pre_boot_steps(str(testguest), tmp_path))
    info = answers[0].json()
    assert info["state"] == "Not started" and info["id"] == "anonymous-instance"
    assert answers[1].json()["firecracker_version"] == "1.17.0"
    assert answers[2].json() == {"vcpu_count": 1, "mem_size_mib": 128, "smt": False, "track_dirty_pages": False,
                                 "huge_pages": "None"}
    assert answers[15].json() == {"latest": {"meta-data": {"instance-id": "i-1", "zone": "z1"}}}
    config = answers[16].json()
    assert config["machine-config"]["mem_size_mib"] == 256
    assert config["boot-source"]["kernel_image_path"] == str(testguest)
    assert [d["drive_id"] for d in config["drives"]] == ["rootfs"]
    assert [n["iface_id"] for n in config["network-interfaces"]] == ["eth0"]
    assert config["mmds-config"] == {"version": "V2", "network_interfaces": ["eth0"], "ipv4_address": None,
                                     "imds_compat": False}
    assert answers[12].headers.get("deprecation") is None  # V2 is not deprecated
    run_steps(proc, validator, UNSUPPORTED_STEPS)
    run_steps(proc, validator, NEGATIVE_STEPS)

    # The configuration has devices the builder may not make yet: both answers are correct.
    start = Step("PUT", "/actions", {"action_type": "InstanceStart"}, (204, 400))
    [resp] = run_steps(proc, validator, [start])
    state = proc.api.get("/").json()["state"]
    if resp.status == 400:
        assert resp.fault.startswith("Start microvm error: ")
        assert any(word in resp.fault.lower() for word in DEVICE_WORDS), resp.fault
        assert state == "Not started"
    else:
        assert state == "Running"
    # The logger writes JSON lines with the level and origin asked for.
    records = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
    assert records and all("level" in r and "origin" in r for r in records)
    assert any(r["event"] == "API request" and r.get("path") == "/actions" for r in records)


def test_after_boot_every_endpoint_answers_per_the_contract(vmm_process, validator, testguest, tmp_path) -> None:
    metrics = tmp_path / "metrics"
    proc = vmm_process("--metrics-path", str(metrics), "--id", "conformance-vm")
    run_steps(proc, validator, [
        Step("PUT", "/boot-source", {"kernel_image_path": str(testguest), "boot_args": "mode=echo"}),
        Step("PUT", "/actions", {"action_type": "InstanceStart"}),
    ])
    proc.wait_for_output("ECHO READY")
    answers = run_steps(proc, validator, post_boot_steps(str(testguest), tmp_path))
    assert answers[0].json() == {"id": "conformance-vm", "state": "Running", "vmm_version": answers[0].json()[
        "vmm_version"], "app_name": "Ember"}
    assert answers[2].json()["state"] == "Paused"
    assert answers[11].json() == {"k": "v", "k2": {"a": 1}}
    line = json.loads(metrics.read_text().splitlines()[-1])
    assert line["vcpu"]["exit_io_out"] > 0 and line["uart"]["write_count"] > 0
    assert line["put_api_requests"]["actions_count"] >= 2
    assert line["latencies_us"]["pause_vm"] > 0
    assert proc.proc.poll() is None


def test_firecrackers_getting_started_flow_with_curl(apiclient, vmm_process, testguest, tmp_path) -> None:
    """docs/getting-started.md, "Running Firecracker": the same curl calls, with the test guest.

    Drives and network interfaces are accepted into the configuration; until
    Ember has virtio-block and virtio-net, InstanceStart refuses them by name
    and the VMM keeps serving. Once it has them, the guest boots and says PASS.
    """
    if not apiclient.have_curl():
        pytest.skip("needs curl")
    vmm = vmm_process(stdin=subprocess.DEVNULL)
    sock = vmm.sock
    logfile = tmp_path / "fc.log"
    rootfs = tmp_path / "rootfs.ext4"
    rootfs.write_bytes(b"\0" * 65536)
    kernel, boot_args = str(testguest), "console=ttyS0 reboot=k panic=1 mode=hello"
    fc_mac, tap_dev = "06:00:AC:10:00:02", "tap0"
    curl = apiclient.curl
    answers = [
        curl(sock, "PUT", "/logger", f"""{{
        "log_path": "{logfile}",
        "level": "Debug",
        "show_level": true,
        "show_log_origin": true
    }}"""),
        curl(sock, "PUT", "/boot-source", f"""{{
        "kernel_image_path": "{kernel}",
        "boot_args": "{boot_args}"
    }}"""),
        curl(sock, "PUT", "/drives/rootfs", f"""{{
        "drive_id": "rootfs",
        "path_on_host": "{rootfs}",
        "is_root_device": true,
        "is_read_only": false
    }}"""),
        curl(sock, "PUT", "/network-interfaces/net1", f"""{{
        "iface_id": "net1",
        "guest_mac": "{fc_mac}",
        "host_dev_name": "{tap_dev}"
    }}"""),
    ]
    assert [a.status for a in answers] == [204] * 4, [str(a) for a in answers]
    time.sleep(0.015)
    start = curl(sock, "PUT", "/actions", """{
        "action_type": "InstanceStart"
    }""")
    if start.status == 204:
        # The guest runs `hello` and resets the machine: the VMM exits 0.
        assert vmm.wait() == 0, vmm.describe()
        assert "TESTGUEST hello PASS" in vmm.stdout, vmm.describe()
    else:
        assert start.status == 400, str(start)
        fault = start.json()["fault_message"]
        assert fault.startswith("Start microvm error: ") and any(w in fault.lower() for w in DEVICE_WORDS), fault
        info = curl(sock, "GET", "/")
        assert info.status == 200 and info.json()["state"] == "Not started"
    records = [json.loads(line) for line in logfile.read_text().splitlines()]
    assert any(r.get("path") == "/boot-source" for r in records)
    assert all(r.get("level") and r.get("origin") for r in records)
