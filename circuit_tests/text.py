"""Text from a pull request (spec names, model names, prompts, answers), made safe to print.

Such text ends up in messages. Before it reaches a terminal, JUnit XML or a report,
:func:`printable` writes control characters and lone surrogates as escapes, so a spec cannot clear
the screen, print a fake summary or crash the writer. It also escapes the ``:`` of a line that
starts with ``::``: GitHub Actions reads such a line of a step's output as a workflow command
(``::error::``, ``::stop-commands::``). :func:`has_control` refuses all of these in names and paths.
"""

from __future__ import annotations

import re

# Control characters (C0 but newline and tab, DEL, C1) and the bidirectional overrides that can
# make a terminal show text other than the text itself; lone surrogates, which no output can encode.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_UNPRINTABLE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_WORKFLOW_COMMAND = re.compile(r"^(\s*):(?=:)", re.MULTILINE)  # GitHub Actions' runner strips leading space first


def printable(text: str, one_line: bool = False) -> str:
    """``text`` with control characters written as escapes (``\\x1b``), and the first ``:`` of a line starting with
    ``::`` as ``\\x3a``; ``one_line`` escapes newlines too."""
    pattern = _UNPRINTABLE_LINE if one_line else _UNPRINTABLE
    text = pattern.sub(lambda match: _escape(match.group()), text)
    return _WORKFLOW_COMMAND.sub(lambda match: match.group(1) + _escape(":"), text)


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def has_control(text: str) -> bool:
    """Whether ``text`` holds a control character (newline and tab included) or a lone surrogate: not allowed in names."""
    return _UNPRINTABLE_LINE.search(text) is not None


def has_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (JSON's or YAML's ``"\\ud800"``): not a character; no output can encode it."""
    return _SURROGATE.search(text) is not None


SURROGATE_FIX = ("a lone surrogate (an escape from \\ud800 to \\udfff without its pair) is not a character, and no "
                 "output can write it. Write the character itself, or both halves of its pair")
MESSAGE_LIMIT = 300  # characters of a library's own error message kept in ours


def quoted(value) -> str:
    """``repr`` of a name from a spec or the command line, with any character a terminal would act on escaped."""
    return printable(repr(value), one_line=True)


def shown(path) -> str:
    """A path or name on one line, escaped as :func:`printable` escapes text."""
    return printable(str(path), one_line=True)


def first_line(error: BaseException) -> str:
    """The first line of a library's error message, without a traceback, at most :data:`MESSAGE_LIMIT` characters."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0].rstrip('.')}" if lines else type(error).__name__
    text = printable(text, one_line=True)
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"
