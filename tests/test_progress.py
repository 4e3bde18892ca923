"""Progress on the steps that take minutes: a bar on a terminal, plain lines with an ETA in a log."""

from __future__ import annotations

import io

from lit_coupling.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_lines_with_counts_and_an_eta_at_most_every_few_seconds_and_the_last():
    log = io.StringIO()
    with Progress(10, "scoring", unit="piece", stream=log, every_s=3600) as progress:
        for _ in range(10):
            progress.update()
    lines = log.getvalue().splitlines()
    assert lines == [lines[-1]] and lines[-1].startswith("scoring: 10/10 piece (") and "ETA 0s" in lines[-1]


def test_a_resumed_count_starts_where_it_stopped_and_every_line_is_printed_when_asked():
    log = io.StringIO()
    progress = Progress(100, "key covariance", unit="tok", stream=log, every_s=0, initial=40)
    progress.update(30)
    progress.update(30)
    assert [line.split(" (")[0] for line in log.getvalue().splitlines()] == [
        "key covariance: 70/100 tok",
        "key covariance: 100/100 tok",
    ]


def test_a_terminal_gets_a_bar_and_a_disabled_progress_prints_nothing():
    terminal = Terminal()
    with Progress(5, "edit", stream=terminal) as progress:
        assert progress.bar is not None
        progress.update(5)
    assert "edit" in terminal.getvalue()
    quiet = io.StringIO()
    with Progress(5, "edit", stream=quiet, enabled=False) as progress:
        progress.update(5)
    assert quiet.getvalue() == ""
