"""Ember VMM: one microVM per process, on /dev/kvm."""

__version__ = "0.1.0"
