"""TemplateStore's saved pool settings: what SetPool leaves for the next service start."""

from __future__ import annotations

import json
import os
import time

import pytest

from poolsvc.launcher import TemplateNotFound, TemplateStore


@pytest.fixture
def store(tmp_path) -> TemplateStore:
    s = TemplateStore(tmp_path)
    (s.dir / "py").mkdir(parents=True)
    (s.dir / "py" / "template.json").write_text("{}")  # pool settings only need the template to exist
    return s


def test_saved_bounds_come_back_and_are_replaced_atomically(store: TemplateStore) -> None:
    assert store.pool_settings("py") is None
    store.save_pool_settings("py", 2, 5)
    assert store.pool_settings("py") == (2, 5)
    store.save_pool_settings("py", 0, 0)
    assert store.pool_settings("py") == (0, 0)
    assert sorted(p.name for p in (store.dir / "py").iterdir()) == ["pool.json", "template.json"]


def test_a_missing_template_is_not_found(store: TemplateStore) -> None:
    with pytest.raises(TemplateNotFound):
        store.save_pool_settings("other", 1, 1)
    assert not (store.dir / "other").exists()


@pytest.mark.parametrize("content", [
    "not json", "[]", "{}", json.dumps({"min_warm": 3, "max_warm": 1}), json.dumps({"min_warm": -1, "max_warm": 1}),
    json.dumps({"min_warm": "1", "max_warm": 2}), json.dumps({"min_warm": True, "max_warm": 2}),
    json.dumps({"min_warm": 1, "max_warm": 2**40}),
])
def test_a_damaged_file_is_ignored_not_fatal(store: TemplateStore, content: str) -> None:
    (store.dir / "py" / "pool.json").write_text(content)
    assert store.pool_settings("py") is None


def test_a_verified_files_identity_survives_the_jails_hard_links_but_not_a_write(tmp_path) -> None:
    from poolsvc.launcher import _file_identity

    f = tmp_path / "vm.mem"
    f.write_bytes(b"memory")
    before = _file_identity(f)
    time.sleep(0.02)  # past the coarse clock's tick: the link below does change the file's ctime
    os.link(f, tmp_path / "jail-link")  # what every jail does, and undoes at destroy
    os.unlink(tmp_path / "jail-link")
    assert _file_identity(f) == before
    with open(f, "r+b") as fh:
        fh.write(b"M")
    os.utime(f, ns=(0, 12345))
    assert _file_identity(f) != before
    assert _file_identity(tmp_path / "missing") == ()
