"""VMM core benchmarks: start-up time and the VMM's own memory.

    python -m bench.vmm_core [--runs 20] [--json]

start: for each run, spawn `ember-vmm --no-api --boot-timer` with a guest
whose first instruction writes the boot-timer magic. Reported per run:
  - vmm_wall_ms / vmm_cpu_ms: the VMM's own Guest-boot-time (from the top of
    `vmm.main` to the guest's first instruction, wall and process CPU), the
    figure Firecracker's "starts in 8 CPU ms" refers to;
  - spawn_to_guest_ms: from fork/exec to the same instant (adds the Python
    interpreter's start-up and imports);
  - total_ms: spawn to process exit (the guest resets at once).
memory: one VMM with an idle 128 MiB guest; its RSS minus the guest memory
mappings (Firecracker's CI method) and its PSS minus theirs, from
/proc/PID/smaps.
Medians of one run of this command are what the notes report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.guests import build

BOOT_RE = re.compile(r"Guest-boot-time =\s*(\d+) us \d+ ms,\s*(\d+) CPU us")


def _config(kernel: Path, mem_mib: int, tmp: Path) -> Path:
    cfg = tmp / "vm.json"
    cfg.write_text(json.dumps({
        "boot-source": {"kernel_image_path": str(kernel), "boot_args": "console=ttyS0"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": mem_mib},
    }))
    return cfg


def _vmm_cmd(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "vmm.main", "--no-api", "--config-file", str(cfg), "--boot-timer",
            "--no-pvm-compat"]


def bench_start(runs: int) -> dict:
    kernel = build("first")
    samples = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(kernel, 128, Path(tmp))
        for _ in range(runs):
            t0 = time.monotonic()
            p = subprocess.Popen(_vmm_cmd(cfg), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
            seen = None
            for line in p.stderr:
                m = BOOT_RE.search(line)
                if m and seen is None:
                    seen = (time.monotonic(), int(m.group(1)), int(m.group(2)))
            rc = p.wait()
            t_end = time.monotonic()
            if rc != 0 or seen is None:
                raise RuntimeError(f"VMM run failed (status {rc})")
            samples.append({
                "vmm_wall_ms": seen[1] / 1000,
                "vmm_cpu_ms": seen[2] / 1000,
                "spawn_to_guest_ms": (seen[0] - t0) * 1000,
                "total_ms": (t_end - t0) * 1000,
            })
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]} | {"runs": runs}


def _smaps(pid: int) -> list[dict]:
    maps, cur = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                cur = {"size": end - start, "name": line.split()[5] if len(line.split()) > 5 else ""}
                maps.append(cur)
            elif cur is not None and ":" in line:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[-1] == "kB":
                    cur[key] = int(parts[0])
    return maps


def bench_memory(mem_mib: int = 128, settle_s: float = 1.0) -> dict:
    kernel = build("idle")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(kernel, mem_mib, Path(tmp))
        p = subprocess.Popen(_vmm_cmd(cfg), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        try:
            for line in p.stderr:
                if BOOT_RE.search(line):
                    break
            time.sleep(settle_s)
            maps = _smaps(p.pid)
        finally:
            p.kill()
            p.wait()
    guest = [m for m in maps if m["size"] == mem_mib << 20 and not m["name"]]
    total_rss = sum(m.get("Rss", 0) for m in maps)
    total_pss = sum(m.get("Pss", 0) for m in maps)
    guest_rss = sum(m.get("Rss", 0) for m in guest)
    guest_pss = sum(m.get("Pss", 0) for m in guest)
    private = sum(m.get("Private_Dirty", 0) + m.get("Private_Clean", 0) for m in maps if m not in guest)
    return {
        "guest_mem_mib": mem_mib,
        "guest_mappings_found": len(guest),
        "rss_mib": total_rss / 1024,
        "rss_minus_guest_mib": (total_rss - guest_rss) / 1024,
        "pss_minus_guest_mib": (total_pss - guest_pss) / 1024,
        "private_minus_guest_mib": private / 1024,
        "guest_rss_mib": guest_rss / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result = {"start": bench_start(args.runs), "memory": bench_memory()}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for section, values in result.items():
            print(section)
            for k, v in values.items():
                print(f"  {k:26} {v:10.2f}" if isinstance(v, float) else f"  {k:26} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
