"""Reading files a pull request controls, and printing text from them."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from circuit_tests.files import JSON_DEPTH, UnreadableInput, _deeper_than, inside, parse_json, read_text
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


@pytest.mark.parametrize("text, message", [
    ('{"nodes": [1], "nodes": [2]}', "gives the key 'nodes' twice in one object"),
    ('{"models": {"a": {"x": 1}, "a": {"x": 2}}}', "gives the key 'a' twice in one object"),
    ("[" * (JSON_DEPTH + 1) + "]" * (JSON_DEPTH + 1), f"is nested more than {JSON_DEPTH} levels deep"),
    ('{"a": ' * 200_000 + "1" + "}" * 200_000, f"is nested more than {JSON_DEPTH} levels deep"),  # no RecursionError
    ("[[]" * 40 + "]" * 40, f"is nested more than {JSON_DEPTH} levels deep"),  # no long run of opening brackets
    ("[" * 200_000, f"is nested more than {JSON_DEPTH} levels deep"),
    ('{"a": 1,}', "is not valid JSON (Expecting property name enclosed in double quotes at line 1, column 9)"),
])
def test_json_a_pull_request_controls_is_refused_with_the_reason(tmp_path, text, message):
    with pytest.raises(UnreadableInput, match=re.escape(f"{tmp_path / 'f.json'} {message}")):
        parse_json(text, tmp_path / "f.json")


def test_json_as_deep_as_allowed_is_read_and_brackets_inside_strings_do_not_count(tmp_path):
    assert parse_json("[" * JSON_DEPTH + "]" * JSON_DEPTH, tmp_path / "f.json") is not None
    inner = "[" * (JSON_DEPTH - 1) + "]" * (JSON_DEPTH - 1)  # inside an object: as deep as allowed
    assert parse_json('{"s": "' + "[{" * 100 + '\\"]", "t": ' + inner + "}", tmp_path / "f.json")["s"] == "[{" * 100 + '"]'
    with pytest.raises(UnreadableInput, match="nested more than"):
        parse_json('{"s": "\\\\", "t": ' + "[" * JSON_DEPTH + "]" * JSON_DEPTH + "}", tmp_path / "f.json")  # an escaped backslash ends no string


def test_the_depth_check_finds_nesting_that_never_shows_a_long_run_of_opening_brackets():
    five = "[[[][][]][[[][]][[][][[][][]]][[][]]]]"  # 5 deep; no run of 5 opening brackets before any pass removes pairs
    assert _deeper_than(five, 4) and not _deeper_than(five, 5)
