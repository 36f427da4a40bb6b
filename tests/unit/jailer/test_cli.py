"""`ember-jailer`'s flags (Firecracker's jailer) and the spec they make; argument errors."""

from __future__ import annotations

import pytest

from jailer.cli import build_parser, main, spec_from_args


def test_firecracker_flags_make_the_spec() -> None:
    args = build_parser().parse_args([
        "--id", "vm7", "--exec-file", "/usr/bin/ember-vmm", "--uid", "123", "--gid", "100",
        "--chroot-base-dir", "/srv/j", "--netns", "/var/run/netns/n7", "--cgroup", "memory.limit_in_bytes=1024",
        "--cgroup", "pids.max=10", "--cgroup-version", "1", "--resource-limit", "fsize=4096",
        "--new-pid-ns", "--daemonize", "--hard-link", "/t/vm.mem:/vm.mem", "--bind", "/t/k:/k:rw",
        "--", "--api-sock", "/api.sock"])
    spec = spec_from_args(args)
    assert spec.chroot == "/srv/j/ember-vmm/vm7/root"
    assert (spec.uid, spec.gid, spec.netns, spec.new_pid_ns) == (123, 100, "/var/run/netns/n7", True)
    assert spec.cgroup is not None and spec.cgroup.path == "ember-vmm/vm7" and spec.cgroup.version == 1
    assert spec.cgroup.settings == (("memory.limit_in_bytes", "1024"), ("pids.max", "10"))
    assert dict(spec.rlimits) == {"no-file": 2048, "fsize": 4096}
    assert [(ln.source, ln.target) for ln in spec.links] == [("/t/vm.mem", "/vm.mem")]
    assert [(b.source, b.target, b.read_only) for b in spec.binds] == [("/t/k", "/k", False)]
    assert args.vmm_args == ["--", "--api-sock", "/api.sock"]


def test_no_cgroup_without_settings_and_parent_cgroup() -> None:
    base = ["--id", "a", "--exec-file", "/bin/x", "--uid", "1", "--gid", "1"]
    assert spec_from_args(build_parser().parse_args(base)).cgroup is None
    spec = spec_from_args(build_parser().parse_args([*base, "--cgroup", "pids.max=1", "--parent-cgroup", "/p/q"]))
    assert spec.cgroup is not None and spec.cgroup.path == "p/q/a" and spec.cgroup.version == 0


@pytest.mark.parametrize("bad", [
    ["--resource-limit", "cpu=1"], ["--resource-limit", "fsize=x"], ["--cgroup", "novalue"],
    ["--cgroup-version", "3"], ["--bind", "a:b:c:d"],
])
def test_bad_flags_exit_2(bad, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--id", "a", "--exec-file", "/bin/true", "--uid", "1", "--gid", "1", *bad])
    assert exc.value.code == 2


def test_uid_0_is_refused(capsys) -> None:
    assert main(["--id", "a", "--exec-file", "/bin/true", "--uid", "0", "--gid", "1"]) == 2
    assert "uid" in capsys.readouterr().err
