"""Reading files a pull request controls, and printing text from them."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from circuit_tests.files import UnreadableInput, inside, read_text
from circuit_tests.text import has_control, printable


def test_printable_escapes_what_a_terminal_would_act_on():
    assert printable("\x1b[2J\x1b[32m 5 passed\r") == "\\x1b[2J\\x1b[32m 5 passed\\x0d"
    assert printable("a\u202eb\x9bc\x7f") == "a\\u202eb\\x9bc\\x7f"  # bidi override, C1 CSI, DEL
    assert printable("two\nlines\tand a tab") == "two\nlines\tand a tab"
    assert printable("two\nlines", one_line=True) == "two\\x0alines"
    assert printable(printable("\x1b")) == "\\x1b"  # escaping twice changes nothing more


def test_printable_leaves_no_line_that_github_actions_would_run_as_a_workflow_command():
    forged = "passed\n::error::forged\n   ::stop-commands::token\nkept::as it is"
    assert printable(forged) == "passed\n\\x3a:error::forged\n   \\x3a:stop-commands::token\nkept::as it is"
    assert printable(printable(forged)) == printable(forged)


def test_a_lone_surrogate_is_escaped_and_refused_in_names():
    assert printable("a\ud800b", one_line=True) == "a\\ud800b"
    assert printable("a\ud800b").encode("utf-8") == b"a\\ud800b"  # writable, where the surrogate itself is not
    assert has_control("ckpt\udcff")  # a file name that is not UTF-8, as Python decodes it


def test_names_with_control_characters_are_recognised():
    assert has_control("model\n") and has_control("a\x1bb") and has_control("\u2066x")
    assert not has_control("org/model@v1.0 ünïcode")


def test_a_regular_file_inside_the_roots_is_read_through_a_link_inside_them(tmp_path):
    (tmp_path / "a.txt").write_text("ok")
    (tmp_path / "link.txt").symlink_to(tmp_path / "a.txt")
    assert read_text(tmp_path / "link.txt", [tmp_path], 10) == "ok"
    assert inside(tmp_path / "link.txt", [tmp_path])


def make(kind: str, path, outside):
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "outside":
        path.symlink_to(outside)
    elif kind == "loop":
        path.symlink_to(path)
    elif kind == "large":
        path.write_bytes(b"x" * 11)
    elif kind == "binary":
        path.write_bytes(b"ok\n\xff")


@pytest.mark.parametrize("kind, message", [
    ("fifo", "is a FIFO, not a regular file"), ("directory", "is a directory, not a regular file"),
    ("device", "is outside"), ("outside", "is outside"), ("loop", "is a link that loops"),
    ("large", "is 11 bytes, more than the 10 bytes allowed"), ("binary", "is not UTF-8 text (byte 3, line 2)"),
])
def test_anything_else_is_refused_with_what_it_is(tmp_path, tmp_path_factory, kind, message):
    outside = tmp_path_factory.mktemp("outside") / "secret.txt"
    outside.write_text("secret")
    project = tmp_path / "project"
    project.mkdir()
    make(kind, project / "f", outside)
    with pytest.raises(UnreadableInput, match=re.escape(message)) as error:
        read_text(project / "f", [project], 10)
    assert "secret" not in str(error.value).replace(str(outside), "")


def test_a_device_is_refused_by_kind_where_no_root_is_asked():
    with pytest.raises(UnreadableInput, match="/dev/zero is a character device, not a regular file"):
        read_text(Path("/dev/zero"), None, 10)
