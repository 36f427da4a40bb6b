"""``python -m jailer``: the `ember-jailer` command."""

from jailer.cli import run

run()
