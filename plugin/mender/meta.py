"""What Mender hands the module: the artifact's meta-data and its file tree (untrusted).

Nothing here is trusted or verified: `decode_meta_data` only unwraps the signed manifest that
``otacast-signer mender-artifact`` put in the meta-data, refusing anything else clearly, and
`Tree` reads Mender's small files with size limits.  `verify_manifest` judges the bytes later.
"""

from __future__ import annotations

import base64
import binascii
import json
from functools import cached_property
from pathlib import Path

from otacast.plugin.errors import ReadError, UsageError
from otacast.plugin.trust import read_limited
from otacast.schemas.errors import MalformedManifest, ManifestTooLarge
from otacast.schemas.limits import MAX_MANIFEST_BYTES

from .layout import MAX_BASE64_CHARS, MAX_META_DATA_BYTES, MAX_TREE_FILE_BYTES, META_DATA_KEY


def decode_meta_data(data: bytes) -> bytes:
    """``header/meta-data`` bytes -> the signed manifest bytes, or a clear refusal.

    Nothing here is trusted: this only unwraps, and `verify_manifest` then judges the bytes.
    """
    if len(data) > MAX_META_DATA_BYTES:
        raise ManifestTooLarge(
            f"artifact meta-data is larger than {MAX_META_DATA_BYTES} bytes; an otacast "
            "manifest never is"
        )
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: hostile nesting depth
        raise MalformedManifest("artifact meta-data is not JSON") from None
    if document is None:  # mender-artifact writes `null` when no -m was given
        raise MalformedManifest(
            "artifact has no meta-data: it was not made by `otacast-signer mender-artifact`"
        )
    if not isinstance(document, dict):
        raise MalformedManifest("artifact meta-data is not a JSON object")
    if META_DATA_KEY not in document:
        raise MalformedManifest(f"artifact meta-data has no {META_DATA_KEY!r}")
    extra = sorted(set(document) - {META_DATA_KEY})
    if extra:
        # Nothing else in the meta-data would be acted on; refuse rather than let a publisher
        # believe it was.
        raise MalformedManifest(f"artifact meta-data has unexpected keys: {', '.join(extra)}")
    encoded = document[META_DATA_KEY]
    if not isinstance(encoded, str):
        raise MalformedManifest(f"artifact meta-data {META_DATA_KEY!r} is not a string")
    if len(encoded) > MAX_BASE64_CHARS:
        raise ManifestTooLarge(f"the manifest in the meta-data exceeds {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedManifest(f"artifact meta-data {META_DATA_KEY!r} is not base64") from None
    if not manifest:
        raise MalformedManifest(f"artifact meta-data {META_DATA_KEY!r} is empty")
    return manifest


class Tree:
    """The directory Mender passes as FILE_TREE (read-only for us)."""

    def __init__(self, path: Path) -> None:
        if not path.is_absolute() or not path.is_dir():
            raise UsageError(f"{path} is not a Mender file tree (an absolute directory path)")
        self.path = path

    def read(self, name: str, limit: int) -> bytes:
        data = read_limited(self.path / name, limit, "Mender's")
        if len(data) > limit:
            raise ReadError(f"Mender's {self.path / name} is larger than {limit} bytes")
        return data

    def line(self, name: str) -> str:
        try:
            return self.read(name, MAX_TREE_FILE_BYTES).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ReadError(f"Mender's {self.path / name} is not UTF-8 text") from None

    def meta_data(self) -> bytes:
        """Up to one byte more than allowed: `decode_meta_data` refuses oversize as such."""
        return read_limited(self.path / "header/meta-data", MAX_META_DATA_BYTES, "Mender's")

    @cached_property
    def artifact_name(self) -> str:
        return self.line("header/artifact_name")

    @cached_property
    def device_type(self) -> str | None:
        """Mender's own idea of this device's type (its ``device_type`` file)."""
        if not (self.path / "current_device_type").exists():
            return None
        return self.line("current_device_type") or None
