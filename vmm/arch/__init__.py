"""Architecture-specific boot support. Ember runs x86_64 guests only: see `vmm.arch.x86_64`."""

from . import x86_64

__all__ = ["x86_64"]
