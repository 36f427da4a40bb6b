"""The kernel command line the service gives a template (`template_boot_args`)."""

from __future__ import annotations

import pytest

from poolsvc.service import template_boot_args


@pytest.mark.parametrize("given,expected", [
    ("", "ember.agent=1 ember.exit=idle"),
    ("console=ttyS0 reboot=k", "console=ttyS0 reboot=k ember.agent=1 ember.exit=idle"),
    # `ember template create` passes the built images' boot args: no console shell in a template.
    ("console=ttyS0 panic=1 i8042.noaux ", "console=ttyS0 panic=1 i8042.noaux ember.agent=1 ember.exit=idle"),
    # What the caller sets is kept.
    ("console=ttyS0 ember.exit=shell", "console=ttyS0 ember.exit=shell ember.agent=1"),
    ("mode=agent ember.agent=0 ember.exit=reboot", "mode=agent ember.agent=0 ember.exit=reboot"),
])
def test_a_template_runs_the_agent_and_stays_idle_unless_told_otherwise(given: str, expected: str) -> None:
    assert template_boot_args(given) == expected
