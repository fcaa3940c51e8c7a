"""Reading nginx.conf for the tests in tests/deploy: a parser of its directives and blocks, and its
size and time values (``client_max_body_size 25m``, ``keepalive_timeout 55s``)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = None

    def find(self, name: str) -> list[Directive]:
        return [d for d in self.block or [] if d.name == name]

    def walk(self) -> Iterator[Directive]:
        for child in self.block or []:
            yield child
            yield from child.walk()


def parse_nginx(text: str) -> Directive:
    """A small nginx configuration parser: directives, arguments (quotes honoured) and blocks."""
    tokens = _nginx_tokens(text)
    root = Directive("main", [], [])
    stack = [root]
    words: list[str] = []
    for token, quoted in tokens:
        if not quoted and token == ";":
            stack[-1].block.append(Directive(words[0], words[1:]))  # type: ignore[union-attr]
            words = []
        elif not quoted and token == "{":
            block = Directive(words[0], words[1:], [])
            stack[-1].block.append(block)  # type: ignore[union-attr]
            stack.append(block)
            words = []
        elif not quoted and token == "}":
            assert not words, f"unterminated directive {words}"
            stack.pop()
        else:
            words.append(token)
    assert len(stack) == 1 and not words, "unbalanced braces or unterminated directive"
    return root


def _nginx_tokens(text: str) -> list[tuple[str, bool]]:
    tokens: list[tuple[str, bool]] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char.isspace():
            i += 1
        elif char == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif char in "{};":
            tokens.append((char, False))
            i += 1
        elif char in "'\"":
            end = i + 1
            value = []
            while text[end] != char:
                if text[end] == "\\":
                    end += 1
                value.append(text[end])
                end += 1
            tokens.append(("".join(value), True))
            i = end + 1
        else:
            end = i
            while end < n and not text[end].isspace() and text[end] not in "{};":
                end += 1
            tokens.append((text[i:end], False))
            i = end
    return tokens


def nginx_size(value: str) -> int:
    units = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert match, f"not an nginx size: {value}"
    return int(match.group(1)) * units[match.group(2).lower()]


def nginx_seconds(value: str) -> float:
    """An nginx time (``55s``, ``1m``, ``500ms``; a bare number is seconds) in seconds."""
    units = {"ms": 0.001, "": 1, "s": 1, "m": 60, "h": 3600}
    match = re.fullmatch(r"(\d+)(ms|[smh]?)", value)
    assert match, f"not an nginx time (or one with several units): {value}"
    return int(match.group(1)) * units[match.group(2)]
