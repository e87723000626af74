"""One JSON parser for everything read from files (latent headers and metadata, PNG text records, manifests,
shard indexes, model configs fetched from the Hub): bounded before it parses.

json.loads recurses once per nesting level, so a few kilobytes of `[[[[...` raise RecursionError (or,
in a thread with a small stack, worse), and a 401-digit integer parses but overflows wherever it meets a
float. Here the nesting depth is counted first, outside strings, and refused above MAX_DEPTH with a
ValueError (what every caller already catches for malformed JSON); integers too large for a float become
+-inf, which the value checks downstream name ("must be a finite number").
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 64  # our own documents nest 4 levels at most; diffusers configs 3
_MAX_INT_DIGITS = 308  # beyond this an integer does not fit a float (1.8e308)

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")


class JSONTooDeep(ValueError):
    """A JSON document nested deeper than MAX_DEPTH."""


def nesting_depth(data: str | bytes) -> int:
    """The deepest nesting of arrays and objects in `data` (brackets inside strings do not count)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", raw))
    depth = deepest = 0
    for byte in brackets:
        if byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _may_nest(data: str | bytes | bytearray, max_depth: int) -> bool:
    """False when `data` holds too few opening brackets to nest beyond max_depth (most documents)."""
    opening = data.count("[") + data.count("{") if isinstance(data, str) else data.count(b"[") + data.count(b"{")
    return opening > max_depth


def _int(text: str) -> int | float:
    digits = text.lstrip("-")
    if len(digits) > _MAX_INT_DIGITS:
        return float("-inf") if text.startswith("-") else float("inf")
    return int(text)


def loads(data: str | bytes | bytearray, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads for untrusted text: JSONTooDeep (a ValueError) beyond `max_depth` levels, ValueError for
    anything else malformed (never RecursionError), huge integers as +-inf."""
    if _may_nest(data, max_depth) and nesting_depth(data) > max_depth:
        raise JSONTooDeep(f"JSON nested more than {max_depth} levels deep (a damaged or hostile file)")
    try:
        return json.loads(data, parse_int=_int)
    except RecursionError:  # not reachable after the depth check; kept so that no caller ever sees it
        raise JSONTooDeep("JSON nested too deeply (a damaged or hostile file)") from None
