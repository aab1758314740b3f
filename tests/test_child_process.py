"""LineChild: whole lines from a child's stdout, its stderr relayed at the level it was logged."""

from twisted.logger import LogLevel, capturedLogs

from epost.child_process import LineChild, level_of


def test_stdout_lines_are_handed_on_whole_whatever_the_reads():
    lines, ended = [], []
    child = LineChild("worker", lines.append, ended.append)
    for piece in (b"C 01", b"23\nD 0", b"456\n", b"R 7"):
        child.outReceived(piece)
    assert lines == [b"C 0123", b"D 0456"]
    child.processEnded("gone")
    assert ended == ["gone"]


def test_stderr_lines_keep_the_level_the_child_logged_them_at():
    child = LineChild("courier", lambda line: None, lambda reason: None)
    with capturedLogs() as events:
        child.errReceived(b"2026-11-29T10:00:00+0000 [epost.delivery#error] cannot read\n2026-11-29T10:00:00+0000 [-#info] ok\n")
    assert [(e["log_level"], e["line"]) for e in events] == [
        (LogLevel.error, "2026-11-29T10:00:00+0000 [epost.delivery#error] cannot read"),
        (LogLevel.info, "2026-11-29T10:00:00+0000 [-#info] ok"),
    ]


def test_a_line_in_no_known_format_is_info():
    assert level_of("Traceback (most recent call last):") is LogLevel.info
    assert level_of("x [a#nonsense] y") is LogLevel.info
    assert level_of("2026-11-29T10:00:00+0000 [a#warn] y") is LogLevel.warn
