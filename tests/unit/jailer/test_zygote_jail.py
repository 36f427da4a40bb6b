"""The zygote's spawn request carries a jail spec, validated like any untrusted input."""

from __future__ import annotations

import pytest

from jailer import JailSpec
from vmm.zygote import SpawnRequest, ZygoteError


def test_spawn_request_with_a_jail() -> None:
    spec = JailSpec(id="vm1", chroot="/run/ember/vm1/root", uid=200000, gid=200000, new_pid_ns=True)
    req = SpawnRequest.from_json({"argv": ["--api-sock", "/api.sock"], "jail": spec.to_json()})
    assert req.jail == spec
    assert SpawnRequest.from_json({"argv": []}).jail is None


@pytest.mark.parametrize("jail", [{"id": "vm1"}, [], {**JailSpec(id="a", chroot="/r", uid=1, gid=1).to_json(),
                                                      "uid": 0}])
def test_a_bad_jail_is_refused(jail) -> None:
    with pytest.raises(ZygoteError, match="invalid jail"):
        SpawnRequest.from_json({"argv": [], "jail": jail})
