"""`make demo` ends on the radiologist's page for a person, and exits for a script (issue 16)."""

from __future__ import annotations

import pytest

from pecbir.cli import build_parser
from pecbir.commands.demo import _should_serve


def test_the_demo_serves_the_page_in_a_terminal_only(monkeypatch):
    class Terminal:
        def isatty(self) -> bool:
            return True

    class Pipe:
        def isatty(self) -> bool:
            return False

    monkeypatch.setattr("sys.stdin", Terminal())
    monkeypatch.setattr("sys.stdout", Terminal())
    assert _should_serve("auto") and _should_serve("yes") and not _should_serve("no")
    monkeypatch.setattr("sys.stdout", Pipe())  # `make demo | tee log`, CI, a script
    assert not _should_serve("auto") and _should_serve("yes")


@pytest.mark.parametrize("argv", [["demo"], ["demo", "--serve", "no", "--port", "0"]])
def test_the_demo_options_parse(argv):
    args = build_parser().parse_args(argv)
    assert args.serve in {"auto", "no"} and args.port in {0, 8765}
