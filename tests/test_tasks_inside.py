"""The literal protocol between a checked function and its checker: plain values cross unchanged, nothing else does."""
from __future__ import annotations

import enum
import io
from collections import Counter, OrderedDict, defaultdict, namedtuple

import pytest
from hypothesis import given, strategies as st

from imtune.tasks.inside import FunctionError, answer, as_exception, literal, parse, receive

KEYS = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.tuples(inner, inner), max_leaves=4)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(st.characters(blacklist_categories=())),  # surrogates included
    lambda inner: st.lists(inner, max_size=4) | st.lists(inner, max_size=4).map(tuple)
    | st.dictionaries(KEYS, inner, max_size=4) | st.sets(KEYS, max_size=4), max_leaves=20)


def same(a, b) -> bool:
    """Equal, with the same exact types all the way down (and -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return len(a) == len(b) and all(same(x, y) and same(a[x], b[y]) for x, y in zip(a, b))
    if type(a) is set:
        return sorted(map(repr, a)) == sorted(map(repr, b))
    return repr(a) == repr(b)


@given(VALUES)
def test_plain_values_cross_unchanged(value):
    text = literal(value)
    assert text.isascii() and "\n" not in text
    assert same(parse(text), value)


def test_subclasses_cross_as_their_plain_value():
    class Always(str):
        __eq__ = lambda self, other: True  # noqa: E731
        __hash__ = str.__hash__

    class Level(enum.IntEnum):
        HIGH = 3

    point = namedtuple("Point", "x y")
    counts = defaultdict(int, a=1)
    for value, plain in [(Counter("aab"), {"a": 2, "b": 1}), (OrderedDict(b=1), {"b": 1}), (counts, {"a": 1}),
                         (point(1, 2), (1, 2)), (Level.HIGH, 3), (Always("x"), "x"), ([Always("y")], ["y"])]:
        assert same(parse(literal(value)), plain), value


@pytest.mark.parametrize("value", [object(), b"x", 1j, frozenset(), float("nan"), (x for x in ()), print, [[1j]],
                                   {"a": {1: b""}}])
def test_anything_else_is_refused_where_it_is_sent(value):
    with pytest.raises(TypeError, match="cannot be sent"):
        literal(value)


@pytest.mark.parametrize("text", ["b'x'", "1j", "...", "(1, b'')", "{'a': [1j]}", "{1: ...}", "[...]"])
def test_anything_else_is_refused_where_it_is_received(text):
    with pytest.raises(TypeError, match="cannot be received"):
        parse(text)


@pytest.mark.parametrize("text", ["__import__('os')", "print(1)", "[x for x in ()]", "True.__class__", "a",
                                  "lambda: 1", "frozenset()", "(" * 300 + ")" * 300, "1" * 5000])
def test_code_is_not_a_literal(text):
    with pytest.raises((ValueError, SyntaxError, MemoryError, RecursionError, TypeError)):
        parse(text)


def test_infinities_cross_as_1e999():
    assert literal([float("inf"), -float("inf")]) == "[1e999, -1e999]"
    assert parse("[1e999, -1e999]") == [float("inf"), -float("inf")]


def test_exceptions_arrive_as_builtins_except_those_that_end_iterations():
    assert type(as_exception("ValueError", "bad")) is ValueError and str(as_exception("ValueError", "bad")) == "bad"
    assert type(as_exception("ZeroDivisionError", "x")) is ZeroDivisionError
    for name in ("StopIteration", "StopAsyncIteration", "SystemExit", "KeyboardInterrupt", "GeneratorExit", "Oops",
                 "UnicodeDecodeError", "__import__", "print", "object"):
        error = as_exception(name, "m")
        assert type(error) is FunctionError and str(error) == f"{name}: m", name


@pytest.mark.parametrize("message", [("ok",), ("ok", 1, 2), ["ok", 1], ("raised", 1, "x"), ("raised", "ValueError"),
                                     ("ready",), ("passed",), None, True])
def test_a_malformed_reply_is_a_failure(message):
    with pytest.raises(FunctionError):
        answer(message)


def test_receive_fails_on_the_end_on_junk_and_on_length(monkeypatch):
    assert receive(io.BytesIO(b"('ok', [1, 2])\n('ok', 3)\n")) == ("ok", [1, 2])
    with pytest.raises(FunctionError, match="ended before it replied"):
        receive(io.BytesIO(b"('ok', 1)"))  # no end of line: the process ended mid-reply
    with pytest.raises(FunctionError, match="unreadable reply"):
        receive(io.BytesIO(b"('ok', \xff)\n"))
    monkeypatch.setattr("imtune.tasks.inside.LIMIT", 16)
    with pytest.raises(FunctionError, match="too long"):
        receive(io.BytesIO(b"('ok', '" + b"x" * 32 + b"')\n"))
