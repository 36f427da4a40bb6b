"""Ember's jailer: a per-microVM chroot, namespaces, cgroup, rlimits and no privileges.

`prepare` builds a jail as root, `enter` puts the calling process into it
(after it has imported everything it needs), `cleanup` removes it; the
`ember-jailer` command (`jailer.cli`, ``python -m jailer``) takes
Firecracker's jailer flags. `ImportWatch` reports modules imported after
entering. Imports neither `vmm` nor `poolsvc`; both may import it.
"""

from jailer.cgroup import Cgroup, CgroupError, CgroupMounts, detect_version, limits_settings
from jailer.imports import ImportWatch
from jailer.jail import JailError, JailReport, cgroup_of, cleanup, enter, fork_into_new_pid_ns, jail_status, prepare
from jailer.spec import (
    DEFAULT_DEVICES,
    DEFAULT_RLIMITS,
    RLIMITS,
    BindMount,
    CgroupSpec,
    HardLink,
    JailSpec,
    SpecError,
    chroot_dir,
)

__all__ = [
    "BindMount", "Cgroup", "CgroupError", "CgroupMounts", "CgroupSpec", "DEFAULT_DEVICES", "DEFAULT_RLIMITS",
    "HardLink", "ImportWatch", "JailError", "JailReport", "JailSpec", "RLIMITS", "SpecError", "cgroup_of",
    "chroot_dir", "cleanup", "detect_version", "enter", "fork_into_new_pid_ns", "jail_status", "limits_settings",
    "prepare",
]
