"""MMDS seen from inside Ember's default Linux guest, as Firecracker users use it.

Two microVMs boot at once when the first test of this module runs: one with
MMDS V1, one with V2. Each has one virtio-net interface (`eth0`, MMDS
enabled) backed by `tap0` in a network namespace of its own
(`ember-mmds-<random>`, deleted at teardown), and its store is seeded with
`METADATA` through `ember-vmm --metadata`. The TAP gets no address: MMDS
frames are answered inside the VMM and never reach it.

The guest's `ember.run=` script (busybox sh) gives eth0 a link-local address,
then talks HTTP to 169.254.169.254 with busybox `wget` (GETs) and `nc` (the
V2 token PUT, which wget cannot send), and prints one ``MMDS-<NAME>=<value>``
line per check. `w` prints ``<wget status>:<output>`` with the output's lines
joined by spaces; busybox wget exits 1 and prints ``server returned error:
HTTP/1.1 <status>`` for a non-2xx answer. `t TTL` sends a token PUT and
keeps the answer's status line. Each boot ends with the guest's `reboot -f`,
which must end `ember-vmm` with status 0.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guest.images import ImagesNotBuilt, run_arg, show

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.linux,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and TAP devices need root"),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="needs /dev/net/tun"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs the `ip` command (iproute2)"),
]

BOOT_TIMEOUT_S = 600
GUEST_MAC = "06:00:ac:10:00:02"
METADATA = {
    "latest": {
        "meta-data": {
            "ami-id": "ami-12345",
            "placement": {"availability-zone": "eu-west-1a"},
            "tags": {"a": "b"},
        }
    }
}

# Shared start of both scripts. The /16 on eth0 routes 169.254.169.254 through it.
# The scripts exec as few programs as they can (wget, nc; shell builtins for the
# rest), and no busybox `timeout`: on kvm_pvm hosts a freshly exec'd busybox
# sometimes dies at once (segfault in glibc's __ctype_init, its TLS page read as
# zeroes; QEMU/KVM on the same host does it too), most often while other
# processes start and exit around it. A request that never gets an answer hangs
# the guest instead, and BOOT_TIMEOUT_S reports the console up to there.
NET_SETUP = r"""set -f
H=169.254.169.254
ip addr add 169.254.0.2/16 dev eth0
ip link set eth0 up
echo MMDS-ROUTE=$(ip route get $H)
M=http://$H/latest/meta-data
w(){ r=$(wget -q -O - "$@" 2>&1);echo "$?:"$r;}
"""

V1_SCRIPT = NET_SETUP + r"""echo MMDS-AZ=$(w $M/placement/availability-zone)
echo MMDS-ROOT=$(w http://$H/latest/)
echo MMDS-LIST=$(w $M/)
echo MMDS-JSON=$(w --header 'Accept: application/json' $M)
echo MMDS-MISSING=$(w $M/nope)
echo MMDS-ANYTOKEN=$(w --header 'X-metadata-token: bogus' $M/ami-id)
"""

# `t TTL` PUTs a token request with nc, which sends it, half-closes at printf's
# EOF and prints the answer until MMDS closes the connection (it does after
# answering a peer that sent FIN). R is the raw response, S its status line (with
# its CR; the host strips it). The token is the body, the last line (no newline).
V2_SCRIPT = NET_SETUP + r"""N='
'
t(){ R=$(printf "PUT /latest/api/token HTTP/1.1\r\nHost: $H\r\nX-metadata-token-ttl-seconds: $1\r\nContent-Length: 0\r\n\r\n"|nc $H 80)
S=${R%%$N*};}
t 60
T=${R##*$N}
echo MMDS-PUT=$S
echo MMDS-TOKEN=$T
echo MMDS-NOTOKEN=$(w $M/ami-id)
echo MMDS-WITHTOKEN=$(w --header "X-metadata-token: $T" $M/ami-id)
echo MMDS-AWSTOKEN=$(w --header "X-aws-ec2-metadata-token: $T" $M/tags/a)
echo MMDS-BADTOKEN=$(w --header "X-metadata-token: x$T" $M/ami-id)
t 0
echo MMDS-TTL0=$S
t 21601
echo MMDS-TTLMAX=$S
"""


def _ip(*args: str, check: bool = True) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip() or f'status {proc.returncode}'}")


def _make_netns() -> str:
    """A fresh namespace holding `tap0` (up, no address); nothing is left behind on failure."""
    name = f"ember-mmds-{secrets.token_hex(4)}"
    _ip("netns", "add", name)
    try:
        _ip("netns", "exec", name, "ip", "tuntap", "add", "dev", "tap0", "mode", "tap")
        # No IPv6 router solicitations or MLD reports from the namespace towards the guest.
        _ip("netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.tap0.disable_ipv6=1", check=False)
        _ip("netns", "exec", name, "ip", "link", "set", "tap0", "up")
    except BaseException:
        _ip("netns", "del", name, check=False)
        raise
    return name


@dataclass
class MmdsBoot:
    """One `ember-vmm` running in its namespace; console and stderr go to files."""

    name: str
    netns: str
    proc: subprocess.Popen
    console_path: Path
    stderr_path: Path
    returncode: int | None = None
    console: str = ""
    stderr: str = ""

    def wait(self) -> "MmdsBoot":
        """Wait for the VMM to exit (the guest reboots at the end of its script)."""
        if self.returncode is None:
            try:
                self.proc.wait(timeout=BOOT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
                self._collect()
                pytest.fail(f"boot {self.name} did not end within {BOOT_TIMEOUT_S} s\n{self.describe()}")
            self._collect()
        return self

    def _collect(self) -> None:
        self.returncode = self.proc.returncode
        self.console = self.console_path.read_text(errors="replace")
        self.stderr = self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def marker(self, name: str) -> str:
        """The value the guest printed as ``MMDS-<name>=<value>``; fails the test if absent."""
        m = re.search(rf"^MMDS-{re.escape(name)}=(.*?)\r?$", self.console, re.M)
        if m is None:
            pytest.fail(f"boot {self.name}: no MMDS-{name}= line\n{self.describe()}")
        return m.group(1).strip()

    def describe(self) -> str:
        return (f"status {self.returncode}\n--- stderr\n{self.stderr[-1500:]}\n"
                f"--- console\n{self.console[-4000:]}")

    def __repr__(self) -> str:
        return f"<MmdsBoot {self.name} netns={self.netns} pid={self.proc.pid} rc={self.returncode}>"


def _launch(name: str, version: str, script: str, images: dict, workdir: Path, netns: str) -> MmdsBoot:
    workdir.mkdir(parents=True)
    metadata = workdir / "metadata.json"
    metadata.write_text(json.dumps(METADATA))
    config = workdir / "vm.json"
    config.write_text(json.dumps({
        "boot-source": {
            "kernel_image_path": images["kernel"],
            "initrd_path": images["initrd"],
            "boot_args": f"{images['boot_args']} ember.exit=reboot {run_arg(script)}",
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": GUEST_MAC}],
        "mmds-config": {"version": version, "network_interfaces": ["eth0"]},
    }))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    console_path, stderr_path = workdir / "console.log", workdir / "stderr.log"
    with console_path.open("w") as out, stderr_path.open("w") as err:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "vmm.main", "--no-api",
             "--config-file", str(config), "--metadata", str(metadata), "--id", name],
            cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
    return MmdsBoot(name, netns, proc, console_path, stderr_path)


@pytest.fixture(scope="module")
def boots(tmp_path_factory) -> Iterator[dict[str, MmdsBoot]]:
    """Start the V1 and V2 boots concurrently; tests wait for the one they need."""
    try:
        images = show()
    except ImagesNotBuilt as exc:
        pytest.fail(f"guest images are not built (run `ember images build`): {exc}")
    base = tmp_path_factory.mktemp("mmds")
    namespaces: list[str] = []
    started: dict[str, MmdsBoot] = {}
    try:
        for version, script in (("V1", V1_SCRIPT), ("V2", V2_SCRIPT)):
            namespaces.append(_make_netns())
            name = f"mmds-{version.lower()}"
            started[version] = _launch(name, version, script, images, base / name, namespaces[-1])
        yield started
    finally:
        for boot in started.values():
            boot.kill()
        for ns in namespaces:
            _ip("netns", "del", ns, check=False)


def _wget(boot: MmdsBoot, name: str) -> tuple[int, str]:
    """A `w` marker split into (wget exit status, output)."""
    value = boot.marker(name)
    status, sep, output = value.partition(":")
    assert sep and status.isdigit(), f"{name}: {value!r}\n{boot.describe()}"
    return int(status), output


# --- both versions --------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["V1", "V2"])
def test_guest_runs_the_script_and_reboot_ends_vmm_with_status_0(boots, version) -> None:
    b = boots[version].wait()
    assert b.returncode == 0, b.describe()
    assert "EMBER-INIT-OK" in b.console, b.describe()
    assert re.search(r"^EMBER-RUN-EXIT=0\r?$", b.console, re.M), b.describe()
    assert "Traceback" not in b.stderr, b.describe()
    assert "segfault" not in b.console, b.describe()


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_mmds_address_is_routed_through_eth0(boots, version) -> None:
    b = boots[version].wait()
    assert re.search(r"\bdev eth0\b", b.marker("ROUTE")), b.describe()


# --- V1: no session needed ------------------------------------------------------------------

def test_v1_get_of_a_leaf_prints_its_value(boots) -> None:
    b = boots["V1"].wait()
    assert _wget(b, "AZ") == (0, "eu-west-1a"), b.describe()


def test_v1_get_of_a_dict_lists_its_keys_imds_style(boots) -> None:
    b = boots["V1"].wait()
    assert _wget(b, "ROOT") == (0, "meta-data/"), b.describe()
    # One key per line (joined by spaces by the script), sorted, `/` after dicts.
    assert _wget(b, "LIST") == (0, "ami-id placement/ tags/"), b.describe()


def test_v1_accept_json_returns_the_subtree_as_json(boots) -> None:
    b = boots["V1"].wait()
    status, output = _wget(b, "JSON")
    assert status == 0, b.describe()
    assert json.loads(output) == METADATA["latest"]["meta-data"]


def test_v1_missing_path_is_404(boots) -> None:
    b = boots["V1"].wait()
    status, output = _wget(b, "MISSING")
    assert status != 0 and "404 Not Found" in output, b.describe()


def test_v1_token_is_optional_and_not_enforced(boots) -> None:
    b = boots["V1"].wait()
    assert _wget(b, "ANYTOKEN") == (0, "ami-12345"), b.describe()


# --- V2: session tokens ---------------------------------------------------------------------

def test_v2_get_without_token_is_401(boots) -> None:
    b = boots["V2"].wait()
    status, output = _wget(b, "NOTOKEN")
    assert status != 0 and "401 Unauthorized" in output, b.describe()


def test_v2_token_put_over_raw_tcp_succeeds(boots) -> None:
    b = boots["V2"].wait()
    assert b.marker("PUT") == "HTTP/1.1 200 OK", b.describe()
    assert re.fullmatch(r"[A-Za-z0-9+/=_-]{16,}", b.marker("TOKEN")), b.describe()


def test_v2_get_with_token_succeeds(boots) -> None:
    b = boots["V2"].wait()
    assert _wget(b, "WITHTOKEN") == (0, "ami-12345"), b.describe()
    assert _wget(b, "AWSTOKEN") == (0, "b"), b.describe()


def test_v2_unknown_token_is_401(boots) -> None:
    b = boots["V2"].wait()
    status, output = _wget(b, "BADTOKEN")
    assert status != 0 and "401 Unauthorized" in output, b.describe()


@pytest.mark.parametrize("marker", ["TTL0", "TTLMAX"])
def test_v2_token_ttl_out_of_range_is_400(boots, marker) -> None:
    b = boots["V2"].wait()
    assert b.marker(marker) == "HTTP/1.1 400 Bad Request", b.describe()
