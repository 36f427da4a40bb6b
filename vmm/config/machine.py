"""Machine configuration: vCPUs, memory size, SMT, dirty tracking, huge pages.

Spec: `MachineConfiguration` (PUT/PATCH/GET /machine-config,
``machine-config`` in the config file), `CpuTemplate`. PUT replaces the
configuration but, like Firecracker, is applied as an update (a PUT without
`cpu_template` keeps the template already set); PATCH applies only the
fields given. Both go through `MachineConfig.update`, which validates the
merged result.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import TypeVar

from .errors import InvalidMemorySize, InvalidVcpuCount
from .schema import U8, USIZE, ConfigType, Field, Schema, enum_of, read_bool

__all__ = [
    "HugePages",
    "CpuTemplate",
    "X86_CPU_TEMPLATES",
    "MachineConfig",
    "MachineConfigUpdate",
    "MAX_SUPPORTED_VCPUS",
    "DEFAULT_MEM_SIZE_MIB",
]

# Firecracker vmm_config/machine_config.rs: small workloads only.
MAX_SUPPORTED_VCPUS = 32
# Firecracker vmm_config/machine_config.rs: memory of a default MachineConfig.
DEFAULT_MEM_SIZE_MIB = 128


class HugePages(enum.StrEnum):
    """Spec `MachineConfiguration.huge_pages`: how guest memory is backed."""

    NONE = "None"  # regular 4 KiB pages
    TRANSPARENT = "Transparent"  # madvise(MADV_HUGEPAGE)
    HUGETLBFS_2M = "2M"  # explicit hugetlbfs 2 MiB pages

    @property
    def mem_size_multiple_mib(self) -> int:
        """Guest memory size (MiB) must be a multiple of this."""
        return 1 if self is HugePages.NONE else 2

    @property
    def page_size(self) -> int:
        """Bytes per backing page (THP still maps with 4 KiB granularity)."""
        return 2 << 20 if self is HugePages.HUGETLBFS_2M else 4096


class CpuTemplate(enum.StrEnum):
    """Spec `CpuTemplate` (deprecated static CPU templates)."""

    C3 = "C3"
    T2 = "T2"
    T2S = "T2S"
    NONE = "None"
    T2CL = "T2CL"
    T2A = "T2A"
    V1N1 = "V1N1"  # aarch64 only


# The templates an x86_64 Firecracker accepts, in its declaration order; V1N1
# is an unknown variant there.
X86_CPU_TEMPLATES = (
    CpuTemplate.C3,
    CpuTemplate.T2,
    CpuTemplate.T2S,
    CpuTemplate.NONE,
    CpuTemplate.T2CL,
    CpuTemplate.T2A,
)

_T = TypeVar("_T")

_read_huge_pages = enum_of(HugePages)
_read_cpu_template = enum_of(CpuTemplate, accepted=X86_CPU_TEMPLATES)


@dataclass(frozen=True)
class MachineConfig(ConfigType):
    """Spec `MachineConfiguration`; the defaults are Firecracker's (1 vCPU, 128 MiB)."""

    vcpu_count: int = 1
    mem_size_mib: int = DEFAULT_MEM_SIZE_MIB
    smt: bool = False
    cpu_template: CpuTemplate | None = None
    track_dirty_pages: bool = False
    huge_pages: HugePages = HugePages.NONE

    SCHEMA = Schema(
        "MachineConfig",
        [
            Field("vcpu_count", U8),
            Field("mem_size_mib", USIZE),
            Field("smt", read_bool, default=False),
            Field.option("cpu_template", _read_cpu_template, skip_none=True),
            Field("track_dirty_pages", read_bool, default=False),
            Field("huge_pages", _read_huge_pages, default=HugePages.NONE),
        ],
    )

    @property
    def mem_size_bytes(self) -> int:
        return self.mem_size_mib << 20

    def validate(self) -> None:
        vcpus = self.vcpu_count
        if not 1 <= vcpus <= MAX_SUPPORTED_VCPUS or (self.smt and vcpus > 1 and vcpus % 2):
            raise InvalidVcpuCount()
        if self.mem_size_mib == 0 or self.mem_size_mib % self.huge_pages.mem_size_multiple_mib:
            raise InvalidMemorySize()

    def update(self, update: MachineConfigUpdate) -> MachineConfig:
        """This configuration with `update` applied, validated.

        A `cpu_template` of ``"None"`` in the update clears the template.
        """
        template = self.cpu_template
        if update.cpu_template is CpuTemplate.NONE:
            template = None
        elif update.cpu_template is not None:
            template = update.cpu_template
        merged = replace(
            self,
            vcpu_count=_pick(update.vcpu_count, self.vcpu_count),
            mem_size_mib=_pick(update.mem_size_mib, self.mem_size_mib),
            smt=_pick(update.smt, self.smt),
            cpu_template=template,
            track_dirty_pages=_pick(update.track_dirty_pages, self.track_dirty_pages),
            huge_pages=_pick(update.huge_pages, self.huge_pages),
        )
        merged.validate()
        return merged


def _pick(new: _T | None, old: _T) -> _T:
    return old if new is None else new


@dataclass(frozen=True)
class MachineConfigUpdate(ConfigType):
    """PATCH /machine-config body: every `MachineConfiguration` field, all optional."""

    vcpu_count: int | None = None
    mem_size_mib: int | None = None
    smt: bool | None = None
    cpu_template: CpuTemplate | None = None
    track_dirty_pages: bool | None = None
    huge_pages: HugePages | None = None

    SCHEMA = Schema(
        "MachineConfigUpdate",
        [
            Field.option("vcpu_count", U8, skip_none=True),
            Field.option("mem_size_mib", USIZE, skip_none=True),
            Field.option("smt", read_bool, skip_none=True),
            Field.option("cpu_template", _read_cpu_template, skip_none=True),
            Field.option("track_dirty_pages", read_bool, skip_none=True),
            Field.option("huge_pages", _read_huge_pages, skip_none=True),
        ],
    )

    @property
    def is_empty(self) -> bool:
        """True when the update changes nothing (the API answers "Empty PATCH request.")."""
        return self == MachineConfigUpdate()

    @classmethod
    def from_machine_config(cls, config: MachineConfig) -> MachineConfigUpdate:
        """The update a PUT /machine-config (or the config file) applies."""
        return cls(
            vcpu_count=config.vcpu_count,
            mem_size_mib=config.mem_size_mib,
            smt=config.smt,
            cpu_template=config.cpu_template,
            track_dirty_pages=config.track_dirty_pages,
            huge_pages=config.huge_pages,
        )
