"""The text format of otacast key files, shared by the publisher and the device.

A public key file holds one line ``otacast-ed25519-public <64 hex digits>``; a secret key file
``otacast-ed25519-secret <64 hex digits>`` (the 32-byte Ed25519 seed).  Anything after the hex on
the line is a comment.  A key id is the SHA-256 of the raw 32-byte public key, in hex.
"""

from __future__ import annotations

import hashlib

from .errors import KeyFormatError

PUBLIC_TAG = "otacast-ed25519-public"
SECRET_TAG = "otacast-ed25519-secret"  # noqa: S105 - a file-format tag, not a secret
KEY_BYTES = 32

# A key file is one short line; refuse to read more than this from whatever path we are given.
MAX_KEY_FILE_BYTES = 4096


def key_id(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()


def format_public(public: bytes, comment: str = "") -> str:
    return _format(PUBLIC_TAG, public, comment)


def format_secret(seed: bytes, comment: str = "") -> str:
    return _format(SECRET_TAG, seed, comment)


def _format(tag: str, raw: bytes, comment: str) -> str:
    if len(raw) != KEY_BYTES:
        raise ValueError("an Ed25519 key is 32 bytes")
    line = f"{tag} {raw.hex()}"
    return f"{line} {comment}\n" if comment else line + "\n"


def parse_public(data: bytes, source: str) -> bytes:
    return _parse(data, source, PUBLIC_TAG)


def parse_secret(data: bytes, source: str) -> bytes:
    return _parse(data, source, SECRET_TAG)


def _parse(data: bytes, source: str, tag: str) -> bytes:
    expected = f"expected '{tag} <64 hex digits>'"
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFormatError(f"{source}: too large for a key file ({expected})")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFormatError(f"{source}: not an otacast key file ({expected})") from None
    fields = text.split(None, 2)
    if len(fields) < 2 or fields[0] not in (PUBLIC_TAG, SECRET_TAG):
        raise KeyFormatError(f"{source}: not an otacast key file ({expected})")
    if fields[0] != tag:
        what = "a secret" if fields[0] == SECRET_TAG else "a public"
        raise KeyFormatError(f"{source}: is {what} key, {expected}")
    try:
        raw = bytes.fromhex(fields[1])
    except ValueError:
        raise KeyFormatError(f"{source}: key is not hexadecimal ({expected})") from None
    if len(raw) != KEY_BYTES:
        raise KeyFormatError(f"{source}: key has {len(raw)} bytes, an Ed25519 key has 32")
    return raw
