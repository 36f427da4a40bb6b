"""`JailSpec`: validation, the JSON round trip, Firecracker's chroot layout."""

from __future__ import annotations

import pytest

from jailer import BindMount, CgroupSpec, HardLink, JailSpec, SpecError, chroot_dir


def _spec(**kw) -> JailSpec:
    args = dict(id="vm-1", chroot="/srv/jailer/ember-vmm/vm-1/root", uid=123, gid=100)
    args.update(kw)
    return JailSpec(**args)


def test_chroot_dir_follows_firecracker() -> None:
    assert chroot_dir("/srv/jailer", "/usr/bin/ember-vmm", "vm7") == "/srv/jailer/ember-vmm/vm7/root"


def test_round_trip_through_json() -> None:
    spec = _spec(netns="/var/run/netns/n1", new_pid_ns=True,
                 cgroup=CgroupSpec("ember/vm-1", (("pids.max", "64"), ("memory.max", "1000")), 2),
                 rlimits=(("no-file", 1024), ("fsize", 1 << 30)),
                 links=(HardLink("/t/vm.mem", "/snap/vm.mem"),), binds=(BindMount("/t/k", "/k", False),))
    assert JailSpec.from_json(spec.to_json()) == spec
    assert spec.hostname == "vm-1"
    assert spec.host_path("/snap/vm.mem") == "/srv/jailer/ember-vmm/vm-1/root/snap/vm.mem"


@pytest.mark.parametrize("changes, message", [
    ({"uid": 0}, "uid"),
    ({"gid": 0}, "gid"),
    ({"uid": True}, "uid"),
    ({"id": "../x"}, "invalid jail id"),
    ({"id": ""}, "invalid jail id"),
    ({"chroot": "relative/root"}, "absolute"),
    ({"chroot": "/"}, "other than /"),
    ({"rlimits": (("cpu", 1),)}, "resource limit"),
    ({"rlimits": (("fsize", -1),)}, "fsize"),
    ({"devices": ("dev/kvm",)}, "absolute"),
    ({"netns": "ns1"}, "netns"),
])
def test_invalid_specs_are_refused(changes, message) -> None:
    with pytest.raises(SpecError, match=message):
        _spec(**changes)


@pytest.mark.parametrize("target", ["relative", "/", "/a/../../etc/passwd", "/.."])
def test_link_targets_stay_inside_the_jail(target) -> None:
    with pytest.raises(SpecError):
        HardLink("/host/file", target)
    with pytest.raises(SpecError):
        _spec().host_path(target)


def test_link_targets_are_normalised() -> None:
    assert HardLink("/h", "/a/./b//c").target == "/a/b/c"


@pytest.mark.parametrize("path", ["", "/abs", "a/../b", "a//b"])
def test_cgroup_paths_are_relative_and_plain(path) -> None:
    with pytest.raises(SpecError):
        CgroupSpec(path)


def test_from_json_refuses_unknown_fields_bad_format_and_bad_types() -> None:
    doc = _spec().to_json()
    with pytest.raises(SpecError, match="unknown fields"):
        JailSpec.from_json({**doc, "privileged": True})
    with pytest.raises(SpecError, match="format"):
        JailSpec.from_json({**doc, "format": 99})
    with pytest.raises(SpecError):
        JailSpec.from_json({**doc, "uid": "123"})
    with pytest.raises(SpecError):
        JailSpec.from_json({**doc, "links": [{"source": "/a"}]})
    with pytest.raises(SpecError):
        JailSpec.from_json([doc])
