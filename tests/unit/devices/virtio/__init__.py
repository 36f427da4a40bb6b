"""Tests of the virtio core, transport and devices."""
