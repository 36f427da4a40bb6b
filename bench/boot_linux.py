"""Linux boot time on Ember's VMM, and where it goes.

    python -m bench.boot_linux [--runs 3] [--vcpus 1] [--mem 128] [--profile] [--json]

Each run boots the default guest (`ember images show`) with `--boot-timer`
and `ember.exit=reboot`, and records:
  - guest_boot_ms: the VMM's Guest-boot-time (VMM start -> the guest's /init
    writes the boot-timer magic);
  - init_ms: process spawn -> the `EMBER-INIT-OK` console line;
  - total_ms: process spawn -> VMM exit after the guest's reboot.
Medians over the runs are reported. With --profile, the first run also
samples every vCPU's RIP each 10 ms (`ember-vmm --rip-profile`) and maps
the samples to kernel functions with the build's System.map: the top
functions and the user-mode share say where the boot spends its time.
"""

from __future__ import annotations

import argparse
import bisect
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

BOOT_RE = re.compile(r"Guest-boot-time =\s*(\d+) us")


def images() -> dict:
    out = subprocess.run([sys.executable, "-m", "poolsvc.cli", "images", "show", "--json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def load_system_map(path: str) -> tuple[list[int], list[str]]:
    addrs, names = [], []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[1] in "tTwW":
                addrs.append(int(parts[0], 16))
                names.append(parts[2])
    order = sorted(range(len(addrs)), key=addrs.__getitem__)
    return [addrs[i] for i in order], [names[i] for i in order]


def symbolize(rip: int, addrs: list[int], names: list[str]) -> str:
    if rip < 0xFFFF_8000_0000_0000:
        return "[user]"
    i = bisect.bisect_right(addrs, rip) - 1
    return names[i] if i >= 0 else "[unknown kernel]"


def boot_once(img: dict, vcpus: int, mem: int, profile: Path | None) -> dict:
    config = {
        "boot-source": {"kernel_image_path": img["kernel"], "initrd_path": img["initrd"],
                        "boot_args": f"{img['boot_args']} ember.exit=reboot"},
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem},
    }
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "vm.json"
        cfg.write_text(json.dumps(config))
        cmd = [sys.executable, "-m", "vmm.main", "--no-api", "--config-file", str(cfg), "--boot-timer"]
        if profile:
            cmd += ["--rip-profile", str(profile)]
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, errors="replace")
        init_at = None
        for line in p.stdout:
            if init_at is None and "EMBER-INIT-OK" in line:
                init_at = time.monotonic()
        rc = p.wait()
        t_end = time.monotonic()
        err = p.stderr.read()
    m = BOOT_RE.search(err)
    if rc != 0 or not m:
        raise RuntimeError(f"boot failed (status {rc}): {err.strip()[-500:]}")
    return {
        "guest_boot_ms": int(m.group(1)) / 1000,
        "init_ms": (init_at - t0) * 1000 if init_at else None,
        "total_ms": (t_end - t0) * 1000,
    }


def profile_report(samples_path: Path, system_map: str, top: int = 25) -> dict:
    addrs, names = load_system_map(system_map)
    counts: Counter[str] = Counter()
    n = 0
    for line in samples_path.read_text().splitlines():
        _, rip = line.split()
        counts[symbolize(int(rip, 16), addrs, names)] += 1
        n += 1
    return {"samples": n, "top": [(name, c, round(100 * c / max(n, 1), 1)) for name, c in counts.most_common(top)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--mem", type=int, default=128)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    img = images()
    runs, prof = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            ppath = Path(tmp) / "rip.txt" if args.profile and i == 0 else None
            runs.append(boot_once(img, args.vcpus, args.mem, ppath))
            if ppath:
                prof = profile_report(ppath, img["system_map"])
    result = {
        "runs": runs,
        "median": {k: statistics.median(r[k] for r in runs if r[k] is not None) for k in runs[0]},
        "profile": prof,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result["median"].items():
            print(f"{k:16} {v:10.0f} ms (median of {len(runs)})")
        if prof:
            print(f"\nRIP samples: {prof['samples']}")
            for name, c, pct in prof["top"]:
                print(f"  {pct:5.1f}%  {c:6}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
