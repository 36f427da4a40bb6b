"""Tests of the virtio block device."""
