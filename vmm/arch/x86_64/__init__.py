"""Everything x86_64-specific needed to boot a guest, as pure code.

Nothing here calls KVM: functions write boot structures into `GuestMemory`
or return plain data (register dataclasses, CPUID entries, MSR lists, LAPIC
images) that `vmm.kvm` applies to the vCPU.

* `layout`     guest physical address map, RAM regions, MMIO slots and IRQs
* `regs`       segments, boot GDT/IDT, identity page tables, sregs and regs
* `bootparams` Linux zero page + E820, PVH hvm_start_info
* `cpuid`      per-vCPU CPUID normalization, feature hiding, kvm_pvm helpers
* `msr`        MSR indices, boot MSRs, the snapshot MSR list
* `lapic`      LAPIC register image edits (virtual-wire LINT0/LINT1)
* `mptable`    Intel MP table for `acpi=off`
* `acpi`       AML builder and the ACPI tables

Each module's public names are re-exported here.
"""

from . import acpi, bootparams, cpuid, lapic, layout, mptable, msr, regs
from .acpi import *  # noqa: F401,F403 - each module's __all__ is its curated API
from .bootparams import *  # noqa: F401,F403
from .cpuid import *  # noqa: F401,F403
from .lapic import *  # noqa: F401,F403
from .layout import *  # noqa: F401,F403
from .mptable import *  # noqa: F401,F403
from .msr import *  # noqa: F401,F403
from .regs import *  # noqa: F401,F403

__all__ = [
    "acpi", "bootparams", "cpuid", "lapic", "layout", "mptable", "msr", "regs",
    *[n for n in acpi.__all__ if n != "aml"],
    *bootparams.__all__,
    *cpuid.__all__,
    *lapic.__all__,
    *layout.__all__,
    *mptable.__all__,
    *msr.__all__,
    *regs.__all__,
]
