"""KVM bindings: Kvm -> VmFd -> VcpuFd, one ioctl table, typed exits. No policy."""

from . import bindings, exits
from .fd import Kvm, KvmError, VcpuFd, VmFd

__all__ = ["bindings", "exits", "Kvm", "KvmError", "VmFd", "VcpuFd"]
