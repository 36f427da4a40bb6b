"""Core VMM behaviour, checked with the purpose-built test guest (tests/guests).

Each test boots `testguest.elf` in one mode (`mode=<name>` on the command
line) and reads its serial console: `TESTGUEST <mode> START`, the mode's own
lines, `TESTGUEST <mode> PASS`, then the guest resets through the i8042 and
the VMM exits with status 0. The guests do their work in ring 3, so each run
takes well under a second of guest time even on hosts that emulate ring 0.
"""

from __future__ import annotations

import random
import re
import struct

import pytest

GIB = 1 << 30
MIB = 1 << 20
E820_RAM, E820_RESERVED = 1, 2
EBDA_START, HIMEM_START, MMIO_GAP_START = 0x9FC00, 0x100000, 0xD0000000


# --- the guest image itself (no KVM needed) ------------------------------------------


def test_testguest_build_is_cached_and_keeps_the_boot_contract(testguest, guest_build, tmp_path):
    build = guest_build
    assert build.build_testguest() == testguest  # cached: same key, same file
    other = build.build_testguest(tmp_path)
    assert other.read_bytes() == testguest.read_bytes()

    data = testguest.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2  # ELF64
    (e_entry,) = struct.unpack_from("<Q", data, 24)
    assert e_entry == 0x200000
    (e_phoff,) = struct.unpack_from("<Q", data, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    loads = []
    for i in range(e_phnum):
        p_type, _, _, _, p_paddr, _, p_memsz, _ = struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * e_phentsize)
        if p_type == 1:
            loads.append((p_paddr, p_memsz))
    assert min(a for a, _ in loads) == 0x200000
    assert max(a + n for a, n in loads) - 0x200000 < 1 * MIB


def test_testguest_build_reports_compiler_failure(guest_build, tmp_path):
    with pytest.raises(guest_build.GuestBuildError, match="cannot run"):
        guest_build.build_testguest(tmp_path, gcc=str(tmp_path / "no-such-gcc"))


# --- booting it --------------------------------------------------------------------------


@pytest.mark.kvm
def test_serial_hello(testguest, run_vmm):
    result = run_vmm(testguest, "mode=hello")
    result.assert_guest_passed("hello")
    assert "Hello from Ember test guest" in result.lines, result.describe()


@pytest.mark.kvm
def test_unknown_mode_fails_in_the_guest(testguest, run_vmm):
    result = run_vmm(testguest, "mode=no-such-mode")
    assert any(line.startswith("TESTGUEST no-such-mode FAIL unknown mode") for line in result.lines), \
        result.describe()
    assert result.returncode == 0, result.describe()


@pytest.mark.kvm
@pytest.mark.parametrize("kind, vector", [("ud", 6), ("pf", 14), ("gp", 13)])
def test_guest_exception_is_reported(testguest, run_vmm, kind, vector):
    result = run_vmm(testguest, f"mode=fault fault.kind={kind}")
    m = re.search(r"^TESTGUEST EXCEPTION vec=(\d+) err=(0x[0-9a-f]+) rip=(0x[0-9a-f]+) cr2=(0x[0-9a-f]+)",
                  result.stdout, re.MULTILINE)
    assert m, result.describe()
    assert int(m.group(1)) == vector, result.describe()
    assert int(m.group(3), 16) >= 0x200000, result.describe()
    if kind == "pf":
        assert int(m.group(4), 16) == 0x8000000000, result.describe()
    assert result.returncode == 0, result.describe()


@pytest.mark.kvm
def test_echo_interrupt_driven_serial(testguest, spawn_vmm):
    vmm = spawn_vmm(testguest, "mode=echo")
    vmm.wait_for_output(r"^ECHO READY")
    vmm.send(b"hello\n")
    vmm.wait_for_output(r"^ECHO:hello\r?$")
    vmm.send(b"interrupts all the way\r\nquit\n")
    result = vmm.wait(timeout=60)
    result.assert_guest_passed("echo")
    assert "ECHO:interrupts all the way" in result.lines, result.describe()
    assert "ECHO:quit" not in result.lines, result.describe()
    stats = re.search(r"^ECHO lines=(\d+) rx_irqs=(\d+) thre_irqs=(\d+)", result.stdout, re.MULTILINE)
    assert stats, result.describe()
    lines, rx_irqs, thre_irqs = map(int, stats.groups())
    assert lines == 2 and rx_irqs >= 1 and thre_irqs >= 1, result.describe()


@pytest.mark.kvm
def test_echo_burst_beyond_fifo_and_guest_buffer(testguest, spawn_vmm):
    # 16 lines at once: more than the UART's 64-byte FIFO and the guest's
    # 256-byte buffer, so the VMM must hold input back and refill the FIFO as
    # the guest drains it (the guest throttles by turning the RX interrupt off).
    sent = [f"line {i:02d} " + "abcdefghijklmnopqrstuvwxyz"[i:] * 2 for i in range(16)]
    vmm = spawn_vmm(testguest, "mode=echo")
    vmm.wait_for_output(r"^ECHO READY")
    vmm.send("".join(s + "\n" for s in sent).encode() + b"quit\n")
    result = vmm.wait(timeout=120)
    result.assert_guest_passed("echo")
    assert [line[5:] for line in result.lines if line.startswith("ECHO:")] == sent, result.describe()


@pytest.mark.kvm
def test_i8042_reset_exits_vmm_with_status_0(testguest, run_vmm):
    result = run_vmm(testguest, "mode=reset", timeout=30)
    assert result.returncode == 0, result.describe()
    lines = [line for line in result.lines if line.strip()]
    assert lines[-1:] == ["TESTGUEST reset START"], result.describe()  # nothing after the reset


@pytest.mark.kvm
@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_smp_acpi_and_ap_startup(testguest, run_vmm, vcpus):
    result = run_vmm(testguest, "mode=smp", vcpus=vcpus)
    result.assert_guest_passed("smp")
    for sig in ("RSDP", "XSDT", "APIC"):
        assert any(line.startswith(f"ACPI {sig} ") and line.endswith(" ok") for line in result.lines), \
            result.describe()
    online = sorted(int(m.group(1)) for m in re.finditer(r"^CPU (\d+) online", result.stdout, re.MULTILINE))
    assert online == list(range(vcpus)), result.describe()
    assert f"CPUS {vcpus}" in result.lines, result.describe()


@pytest.mark.kvm
def test_lapic_timer_and_pit_through_ioapic(testguest, run_vmm):
    result = run_vmm(testguest, "mode=timer timer.ms=500 timer.hz=100")
    result.assert_guest_passed("timer")
    lapic = re.search(r"^LAPIC ticks=(\d+) rate=(\d+) Hz", result.stdout, re.MULTILINE)
    pit = re.search(r"^PIT ticks=(\d+) rate=(\d+) Hz pin=(\d+)", result.stdout, re.MULTILINE)
    assert lapic and pit, result.describe()
    # Nominal 100 Hz each; wide bounds, since a loaded host delays and coalesces ticks.
    assert 25 <= int(lapic.group(2)) <= 400, result.describe()
    assert 25 <= int(pit.group(2)) <= 400, result.describe()


def _expected_ram(mem_mib: int) -> list[tuple[int, int]]:
    size = mem_mib * MIB
    ram = [(0, EBDA_START), (HIMEM_START, min(size, MMIO_GAP_START) - HIMEM_START)]
    if size > MMIO_GAP_START:
        ram.append((4 * GIB, size - MMIO_GAP_START))
    return ram


@pytest.mark.kvm
@pytest.mark.parametrize("mem_mib", [128, 3584])
def test_e820_map_and_memory(testguest, run_vmm, mem_mib):
    result = run_vmm(testguest, "mode=mem", mem_mib=mem_mib)
    result.assert_guest_passed("mem")
    entries = [(int(a, 16), int(s, 16), int(t)) for a, s, t in
               re.findall(r"^E820 (0x[0-9a-f]+) (0x[0-9a-f]+) (\d+)", result.stdout, re.MULTILINE)]
    ram = sorted((a, s) for a, s, t in entries if t == E820_RAM)
    assert ram == _expected_ram(mem_mib), result.describe()
    assert (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED) in entries, result.describe()
    for a, s, t in entries:
        if t != E820_RAM:  # nothing else may claim RAM
            assert all(a + s <= ra or ra + rs <= a for ra, rs in ram), result.describe()
    total = int(re.search(r"^MEM OK (\d+)", result.stdout, re.MULTILINE).group(1))
    assert total == sum(s for _, s in ram) == mem_mib * MIB - (HIMEM_START - EBDA_START), result.describe()


@pytest.mark.kvm
def test_boot_timer(testguest, run_vmm):
    result = run_vmm(testguest, "mode=bootparams", extra_args=("--boot-timer",))
    result.assert_guest_passed("bootparams")
    cmdline = next(line for line in result.lines if line.startswith("CMDLINE "))
    assert "mode=bootparams" in cmdline.split(), result.describe()
    assert "Guest-boot-time = " in result.stdout + result.stderr, result.describe()


# --- bad kernels -------------------------------------------------------------------------


def _assert_one_line_error(result, path) -> None:
    assert result.returncode != 0, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    errors = [line for line in result.stderr.splitlines() if str(path) in line]
    assert len(errors) == 1, result.describe()


@pytest.mark.kvm
def test_missing_kernel_file(run_vmm, tmp_path):
    missing = tmp_path / "no-such-vmlinux"
    result = run_vmm(missing, "mode=hello", timeout=30)
    _assert_one_line_error(result, missing)


@pytest.mark.kvm
def test_corrupt_kernel_file(run_vmm, tmp_path):
    corrupt = tmp_path / "random.bin"
    corrupt.write_bytes(random.Random(0xE3BE).randbytes(64 * 1024))
    result = run_vmm(corrupt, "mode=hello", timeout=30)
    _assert_one_line_error(result, corrupt)
