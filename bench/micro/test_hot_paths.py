"""pytest-benchmark micro-benchmarks of Ember's hot paths.

    python -m pytest bench/micro -p no:cacheprovider --benchmark-only [--benchmark-json out.json]

- pool hand-out: one Acquire through the pure `PoolMachine` (a warm VM
  resumed and leased) plus its Release and the refill's restore;
- gRPC round trip: GetPoolStatus through the real servicer to an in-process
  dict backend;
- agent protocol: encode + decode of an EXEC request;
- snapshot state: encode + decode of a VM state tree of realistic size;
- restore (real KVM): a test-guest snapshot loaded in-process with the File
  backend (`build_from_snapshot`) and torn down;
- fork: the zygote forks a VMM process (``ember-vmm --version``: it is
  named, parses its flags and exits) and reports its exit.

Medians are what the notes report; this machine is shared and noisy, so
compare ratios measured in one run.
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
import threading
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_pool_hand_out(benchmark) -> None:
    from poolsvc.pool import HostBudget, PoolMachine, Resume, StartRestore

    machine = PoolMachine(HostBudget(mem_mib=1 << 20, max_vms=1 << 20), max_restoring=1 << 10)
    now = itertools.count(1)
    for action in machine.set_pool("t", 8, 8, float(next(now))):
        if isinstance(action, StartRestore):
            machine.restored(action.vm_id, True, float(next(now)))
    requests = itertools.count()

    def run(actions, t: float) -> str | None:
        """Complete every restore at once; the vm id of the Resume, if any."""
        resumed = None
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            if isinstance(action, StartRestore):
                pending += machine.restored(action.vm_id, True, t)
            elif isinstance(action, Resume):
                resumed = action.vm_id
                pending += machine.resumed(action.vm_id, True, t)
            elif type(action).__name__ == "Destroy":
                pending += machine.destroyed(action.vm_id, t)
        return resumed

    def hand_out() -> None:
        t = float(next(now))
        vm_id = run(machine.acquire("t", t, 60.0, None, f"r{next(requests)}"), t)
        assert vm_id is not None
        run(machine.release(vm_id, t), t)

    benchmark(hand_out)


def test_grpc_round_trip(benchmark) -> None:
    import grpc

    sys.path.insert(0, str(REPO_ROOT))
    from poolsvc import proto
    from poolsvc.api_types import PoolStatusInfo, TemplateInfo, TemplateState
    from poolsvc.server import start
    from tests.unit.poolsvc._grpc_fake import FakeBackend

    backend = FakeBackend()
    backend.templates["t"] = TemplateInfo("t", TemplateState.READY, 1, 64, 0.0)
    backend.pools["t"] = PoolStatusInfo("t", 1, 2)
    server, port = start(backend, "127.0.0.1:0")
    pb2, pb2_grpc = proto.load()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb2_grpc.PoolServiceStub(channel)
    request = pb2.GetPoolStatusRequest(template="t")
    stub.GetPoolStatus(request)
    try:
        benchmark(stub.GetPoolStatus, request)
    finally:
        channel.close()
        server.stop(0)


def test_agent_exec_frame_codec(benchmark) -> None:
    from poolsvc.agent import Exec, FrameDecoder, encode

    msg = Exec((b"python3", b"-c", b"print('hi')"), (b"PATH=/bin", b"HOME=/root"), b"/tmp", 5000, b"x" * 1024)

    def round_trip() -> None:
        decoder = FrameDecoder()
        decoder.feed(encode(msg))
        assert decoder.next_message() == msg

    benchmark(round_trip)


def test_snapshot_state_codec(benchmark) -> None:
    from snapshot.format import decode_state, encode_state

    vcpu = {"regs": bytes(144), "sregs": bytes(312), "xsave": os.urandom(4096), "lapic": bytes(1024),
            "msrs": [[0x10 + i, i * 12345] for i in range(65)], "cpuid": [[i, 0, 0, 1, 2, 3, 4] for i in range(77)]}
    tree = {"vcpus": [vcpu], "devices": {"virtio": [{"queues": [{"size": 256, "ready": True}] * 3}] * 3}}

    benchmark(lambda: decode_state(encode_state(tree)))


@pytest.mark.kvm
def test_restore_in_process(benchmark) -> None:
    """build_from_snapshot (File backend) + shutdown of a 64 MiB test-guest snapshot."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs /dev/kvm")
    import importlib.util
    sys.path.insert(0, str(REPO_ROOT))
    spec = importlib.util.spec_from_file_location("ember_tests_apiclient",
                                                  REPO_ROOT / "tests" / "conformance" / "apiclient.py")
    apiclient = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(apiclient)
    from tests.integration.conftest import load_guest_build
    from vmm.builder import build_from_snapshot
    from vmm.persist import FileBackend, MicrovmState

    kernel = load_guest_build().build_testguest()
    with tempfile.TemporaryDirectory(prefix="ember-bm-") as d:
        work = Path(d)
        proc = apiclient.VmmApiProcess(work, ("--id", "bm"))
        try:
            api = proc.api
            api.put("/boot-source", {"kernel_image_path": str(kernel), "boot_args": "mode=echo"})
            api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})
            api.put("/actions", {"action_type": "InstanceStart"})
            proc.wait_for_output("ECHO READY")
            api.patch("/vm", {"state": "Paused"})
            api.put("/snapshot/create", {"snapshot_path": str(work / "s"), "mem_file_path": str(work / "m")})
        finally:
            proc.close()
        state = MicrovmState.read(str(work / "s"))

        built: list = []

        def teardown_previous() -> None:  # untimed: runs before each round
            while built:
                built.pop().shutdown()

        def restore() -> None:
            built.append(build_from_snapshot(state, FileBackend(str(work / "m")), console_out=None))

        try:
            benchmark.pedantic(restore, setup=teardown_previous, rounds=20, warmup_rounds=2)
        finally:
            teardown_previous()


def test_zygote_fork(benchmark) -> None:
    """One VMM process forked by the zygote, run to its exit, and reaped (spawn + wait)."""
    sys.path.insert(0, str(REPO_ROOT))
    from poolsvc.launcher import ZygoteClient

    with tempfile.TemporaryDirectory(prefix="ember-bz-") as d:
        work = Path(d)
        zygote = ZygoteClient(work / "z.sock", work / "zygote.log")
        zygote.start()
        try:
            def fork_one() -> None:
                pid = zygote.spawn(["--version"], stdin=None, stdout=work / "out", stderr=work / "err", cwd=work)
                assert zygote.wait(pid, 10.0) == "exited"

            benchmark(fork_one)
            assert (work / "out").read_text().startswith("ember-vmm v")
        finally:
            zygote.stop()
