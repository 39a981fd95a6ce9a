"""EPICS macro substitution: ``$(NAME)``, ``${NAME}``, ``$(NAME=default)``.

This follows the parts of EPICS's macLib that startup scripts and database
files use. An undefined macro without a default is left in the text as it
was written and reported through ``on_undefined``, so a typo stays visible
in the record name instead of silently becoming an empty string.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Optional

Lookup = Callable[[str], Optional[str]]

_OPENERS = {"(": ")", "{": "}"}
# A value that refers to itself would expand forever.
_MAX_DEPTH = 20


class MacroError(ValueError):
    """A macro reference or definition that cannot be parsed."""


def chain_lookup(*sources: Mapping[str, str]) -> Lookup:
    """Look a name up in each mapping in turn (e.g. substitutions, then environment)."""

    def lookup(name: str) -> str | None:
        for source in sources:
            if name in source:
                return source[name]
        return None

    return lookup


def expand(
    text: str,
    lookup: Lookup,
    on_undefined: Callable[[str], None] | None = None,
    _depth: int = 0,
) -> str:
    """Replace every macro reference in ``text`` using ``lookup``."""
    if _depth > _MAX_DEPTH:
        raise MacroError(f"macro expansion too deep (recursive definition?) in {text!r}")
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] == "$":
            out.append("$")
            i += 2
            continue
        if char == "$" and i + 1 < len(text) and text[i + 1] in _OPENERS:
            body, end = _reference_body(text, i)
            if body is None:
                # An unterminated reference is kept as plain text, like macLib.
                out.append(text[i:])
                break
            out.append(_substitute(body, text[i : end + 1], lookup, on_undefined, _depth))
            i = end + 1
            continue
        out.append(char)
        i += 1
    return "".join(out)


def _reference_body(text: str, start: int) -> tuple[str | None, int]:
    """Return the inside of the reference opened at ``text[start]`` and its closing index."""
    opener = text[start + 1]
    closer = _OPENERS[opener]
    depth = 0
    i = start + 1
    while i < len(text):
        char = text[i]
        if char == opener:
            depth += 1
        elif char == closer:
            depth -= 1
            if depth == 0:
                return text[start + 2 : i], i
        i += 1
    return None, len(text)


def _substitute(
    body: str,
    original: str,
    lookup: Lookup,
    on_undefined: Callable[[str], None] | None,
    depth: int,
) -> str:
    # The name itself may contain macros: $(P$(N)).
    body = expand(body, lookup, on_undefined, depth + 1)
    name, has_default, default = body.partition("=")
    name = name.strip()
    value = lookup(name)
    if value is None:
        if has_default:
            return expand(default, lookup, on_undefined, depth + 1)
        if on_undefined is not None:
            on_undefined(name)
        return original
    return expand(value, lookup, on_undefined, depth + 1)


def parse_definitions(text: str) -> dict[str, str]:
    """Parse a substitution string such as ``P=X:,Q="a, b",R=``.

    Values may be quoted with ``"`` or ``'`` to keep commas; a backslash
    escapes the next character. Surrounding whitespace of names and unquoted
    values is dropped.
    """
    result: dict[str, str] = {}
    for item in _split_top_level(text):
        if not item.strip():
            continue
        name, equals, value = item.partition("=")
        name = name.strip()
        if not name:
            raise MacroError(f"macro definition without a name in {text!r}")
        if not equals:
            # "NAME" alone undefines it in macLib; there is nothing to undefine here.
            continue
        result[name] = _unquote(value.strip())
    return result


def _split_top_level(text: str) -> list[str]:
    items: list[str] = []
    current: list[str] = []
    quote = ""
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if quote:
            if char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == ",":
            items.append("".join(current))
            current = []
            i += 1
            continue
        current.append(char)
        i += 1
    if quote:
        raise MacroError(f"unterminated quote in macro definitions {text!r}")
    items.append("".join(current))
    return items


def _unquote(value: str) -> str:
    out: list[str] = []
    quote = ""
    i = 0
    while i < len(value):
        char = value[i]
        if char == "\\" and i + 1 < len(value):
            out.append(value[i + 1])
            i += 2
            continue
        if quote:
            if char == quote:
                quote = ""
            else:
                out.append(char)
        elif char in "\"'":
            quote = char
        else:
            out.append(char)
        i += 1
    return "".join(out)
