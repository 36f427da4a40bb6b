"""`vmm.logger`: runtime configuration (PUT /logger), JSON lines, and a destination that never blocks."""

from __future__ import annotations

import io
import json
import os
import select

import pytest
import structlog

from vmm.config import LoggerConfig, LogLevel
from vmm.logger import LOGGER, LineWriter, Logger, LogPathError, configure_logging


@pytest.fixture
def logger():
    yield Logger()
    LOGGER.set_defaults()


def records(path) -> list[dict]:
    return [json.loads(line) for line in open(path).read().splitlines()]


def test_json_lines_with_firecrackers_options(logger: Logger, tmp_path) -> None:
    path = tmp_path / "log"
    logger.instance_id = "vm-3"
    logger.configure(LoggerConfig(log_path=str(path), level=LogLevel.DEBUG, show_level=True, show_log_origin=True))
    structlog.get_logger("vmm.api.server").debug("request", method="PUT", path="/actions")
    [rec] = records(path)
    assert list(rec)[:7] == ["timestamp", "instance", "thread", "level", "origin", "logger", "event"]
    assert rec["instance"] == "vm-3" and rec["level"] == "debug" and rec["logger"] == "vmm.api.server"
    assert rec["origin"].startswith("test_logger.py:") and rec["event"] == "request"
    assert (rec["method"], rec["path"]) == ("PUT", "/actions")
    assert rec["timestamp"].endswith("Z")


def test_level_filters_and_unset_fields_keep_their_value(logger: Logger, tmp_path) -> None:
    path = tmp_path / "log"
    logger.configure(LoggerConfig(log_path=str(path), level=LogLevel.WARNING, show_level=True))
    log = structlog.get_logger("vmm.x")
    log.info("hidden")
    log.warning("shown")
    # A configuration without `level` resets it to Info (Firecracker); show_level and the path stay.
    logger.configure(LoggerConfig(show_log_origin=False))
    log.info("now shown")
    log.debug("still hidden")
    recs = records(path)
    assert [r["event"] for r in recs] == ["shown", "now shown"]
    assert all("level" in r for r in recs)
    assert logger.settings.log_path == str(path)


def test_off_and_trace(logger: Logger, tmp_path) -> None:
    path = tmp_path / "log"
    logger.configure(LoggerConfig(log_path=str(path), level=LogLevel.OFF))
    structlog.get_logger("vmm.x").critical("nothing")
    logger.configure(LoggerConfig(level=LogLevel.TRACE))
    structlog.get_logger("vmm.x").debug("everything")
    assert [r["event"] for r in records(path)] == ["everything"]


def test_module_filter_keeps_one_subtree(logger: Logger, tmp_path) -> None:
    path = tmp_path / "log"
    logger.configure(LoggerConfig(log_path=str(path), module="vmm.api"))
    structlog.get_logger("vmm.api.handler").info("kept")
    structlog.get_logger("vmm.builder").info("dropped")
    structlog.get_logger().info("no name: dropped")
    assert [r["event"] for r in records(path)] == ["kept"]


def test_an_unusable_path_changes_nothing(logger: Logger, tmp_path) -> None:
    with pytest.raises(LogPathError, match="Failed to open target file: No such file or directory"):
        logger.configure(LoggerConfig(log_path=str(tmp_path / "no" / "log"), level=LogLevel.DEBUG))
    assert logger.settings.log_path is None and logger.settings.level == 30


def test_default_destination_is_human_readable(logger: Logger) -> None:
    out = io.StringIO()
    logger.set_defaults("Info", out)
    structlog.get_logger("vmm.x").info("hello", n=1)
    text = out.getvalue()
    assert "hello" in text and "n=1" in text and "info" in text
    with pytest.raises(ValueError):
        configure_logging("loud")


def test_a_full_fifo_drops_log_lines_counts_them_and_never_blocks(logger: Logger, tmp_path) -> None:
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    logger.configure(LoggerConfig(log_path=str(fifo), level=LogLevel.INFO))  # no reader: must not block
    log = structlog.get_logger("vmm.x")
    for i in range(2000):  # ~200 KiB: well past the pipe's 64 KiB
        log.info("line", i=i, pad="x" * 64)
    assert logger.missed_log_count > 0
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        data = b""
        while select.select([reader], [], [], 0)[0]:
            chunk = os.read(reader, 1 << 16)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(reader)
    got = [json.loads(x) for x in data.decode().splitlines()]  # every line that got through is whole
    assert len(got) + logger.missed_log_count == 2000
    assert [r["i"] for r in got] == list(range(len(got)))


def test_line_writer_keeps_long_lines_whole(tmp_path) -> None:
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    writer = LineWriter.open(str(fifo))
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        big = "y" * 50_000  # > PIPE_BUF: the kernel may take it in part
        results = [writer.write_line(f"{i} {big}") for i in range(4)]
        data = b""
        for _ in range(100):
            while select.select([reader], [], [], 0)[0]:
                chunk = os.read(reader, 1 << 16)
                if not chunk:
                    break
                data += chunk
            if writer.flush_pending():
                break
        while select.select([reader], [], [], 0)[0]:
            data += os.read(reader, 1 << 16)
    finally:
        os.close(reader)
        writer.close()
    got = data.decode().splitlines()
    assert all(line.endswith(big) for line in got)
    assert len(got) == results.count(True) and writer.dropped == results.count(False)
    assert results[0]


def test_line_writer_appends_to_files(tmp_path) -> None:
    path = tmp_path / "f"
    path.write_text("old\n")
    w = LineWriter.open(str(path))
    assert w.write_line("new") and w.write_line(b"bytes\n")
    w.close()
    assert not w.write_line("after close") and w.dropped == 1
    assert path.read_text() == "old\nnew\nbytes\n"
    assert "written=2" in repr(w)
