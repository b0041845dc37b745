"""Strict JSON in, canonical JSON out.

The signature covers the *canonical bytes* of the manifest's ``signed`` object: UTF-8, keys
sorted by code point, no insignificant whitespace, strings escaped only where JSON requires it
(``"``, ``\\`` and control characters), integers only.  Because the device re-derives these bytes
from the parsed object, the parser must leave no room for two readings of one document: it
refuses duplicate keys, floats, NaN/Infinity, non-UTF-8 input, a byte-order mark and lone
surrogates.  Anything refused raises `MalformedManifest` with a one-line reason.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import MalformedManifest, ManifestTooLarge
from .limits import MAX_MANIFEST_BYTES


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise MalformedManifest(f"duplicate JSON key {key!r}")
        obj[key] = value
    return obj


def _reject_float(text: str) -> Any:
    raise MalformedManifest(f"non-integer number {text[:40]!r} (only integers are allowed)")


def _reject_constant(text: str) -> Any:
    raise MalformedManifest(f"non-standard JSON constant {text!r}")


def loads_strict(data: bytes, *, max_bytes: int = MAX_MANIFEST_BYTES) -> Any:
    """Parse untrusted JSON bytes, refusing anything that could be read two ways."""
    if len(data) > max_bytes:
        raise ManifestTooLarge(f"manifest is {len(data)} bytes, the limit is {max_bytes}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedManifest(f"manifest is not valid UTF-8 (byte {exc.start})") from None
    if text.startswith("\ufeff"):
        raise MalformedManifest("manifest starts with a byte-order mark")
    try:
        return json.loads(
            text,
            object_pairs_hook=_reject_duplicates,
            parse_float=_reject_float,
            parse_constant=_reject_constant,
        )
    except json.JSONDecodeError as exc:
        raise MalformedManifest(
            f"manifest is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise MalformedManifest("manifest JSON is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal with thousands of digits
        raise MalformedManifest(f"manifest JSON has an unusable value: {exc}") from None


def refuse_control_characters(obj: Any, where: str = "") -> None:
    """No manifest string needs a control character; refusing them everywhere also closes the
    gap where a JSON Schema ``$`` (Python regex semantics) lets a trailing newline through."""
    if isinstance(obj, str):
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in obj):
            raise MalformedManifest(f"manifest field {where or '(top level)'}: control character")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            refuse_control_characters(key, where)
            refuse_control_characters(value, f"{where}/{key}" if where else key)
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            refuse_control_characters(value, f"{where}/{index}")


def canonical_bytes(obj: Any) -> bytes:
    """The canonical encoding that signatures cover (see module docstring)."""
    _refuse_non_integers(obj)
    try:
        return json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedManifest("manifest contains a lone surrogate in a string") from None


def _refuse_non_integers(obj: Any) -> None:
    if isinstance(obj, float):
        raise MalformedManifest("floats cannot be signed: use integers")
    if isinstance(obj, dict):
        for value in obj.values():
            _refuse_non_integers(value)
    elif isinstance(obj, list):
        for value in obj:
            _refuse_non_integers(value)


def pretty_bytes(obj: Any) -> bytes:
    """A readable, still deterministic rendering for files people open (not what is signed)."""
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
