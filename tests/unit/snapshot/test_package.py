"""The package's public surface: every exported name exists once; each module has one error family."""

from __future__ import annotations

import snapshot
from snapshot import chunkstore, format, memfile, uffd, uffd_server
from snapshot._errors import DocumentedError


def test_public_names_are_exported():
    for module in (snapshot, format, memfile, chunkstore, uffd, uffd_server):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
        assert len(set(module.__all__)) == len(module.__all__), module.__name__


def test_one_error_family_per_module_with_docstring_messages():
    families = {format: format.SnapshotFormatError, memfile: memfile.MemoryFileError,
                chunkstore: chunkstore.ChunkStoreError, uffd: uffd.UffdError, uffd_server: uffd.UffdError}
    for module, base in families.items():
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, type) and issubclass(obj, Exception):
                assert issubclass(obj, base), f"{module.__name__}.{name}"
                assert obj.__doc__ and obj.__doc__.strip(), name
                assert str(obj()) == obj.__doc__.strip().splitlines()[0].rstrip(".")
    assert issubclass(format.SnapshotFormatError, DocumentedError)
    assert str(chunkstore.SnapshotNotFound("vm-1")) == "No such snapshot: vm-1"
