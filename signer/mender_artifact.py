"""``otacast-signer mender-artifact``: wrap a signed manifest in a Mender artifact.

Theory of operation.  The artifact is a Mender *module-image* of payload type ``otacast`` that
carries no files: its meta-data is ``{"otacast_manifest": "<base64 of the manifest file>"}``, the
manifest's exact bytes, so the device verifies precisely what the release key signed.  On the
device, Mender hands that meta-data to ``otacast-mender-module``, which verifies the manifest and
fetches the image itself (multicast, HTTP fallback).  The real ``mender-artifact`` tool writes
the artifact, so the format is Mender's own, whatever its version.

Two signatures, two jobs.  The manifest's Ed25519 signatures (otacast's release keys) are what
the device trusts for the image.  Mender's artifact signature (``--key``, passed to
``mender-artifact -k``: RSA or ECDSA P-256 only, in PKCS#1 / SEC1 PEM) is optional and outer: a
client with ``ArtifactVerifyKey`` refuses unsigned or altered artifacts before the module runs.

Nothing is written unless mender-artifact succeeded: it writes to a temporary name beside the
output, which is renamed into place.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from otacast.schemas.errors import KeyFormatError
from otacast.schemas.keyfile import MAX_KEY_FILE_BYTES, SECRET_TAG
from otacast.schemas.limits import MAX_MANIFEST_BYTES
from otacast.schemas.manifest import Envelope, parse_envelope

from .errors import MenderArtifactError, WriteError
from .fileio import read_bounded

TOOL = "mender-artifact"
# Must match the device's module (otacast.plugin.mender): the payload type names the module
# Mender runs, and the key is where it looks for the manifest.
PAYLOAD_TYPE = "otacast"
META_DATA_KEY = "otacast_manifest"
# Writing a few megabytes of meta-data takes mender-artifact well under a second; a minute means
# it hangs (e.g. a signing backend that does not answer).
TOOL_TIMEOUT = 60.0
# Keep at most this much of the tool's error output for the reason line.
MAX_REASON = 300


@dataclass(frozen=True)
class Written:
    out: Path
    artifact_name: str
    device_types: tuple[str, ...]
    envelope: Envelope
    meta_data_bytes: int
    signed: bool


def meta_data(manifest: bytes) -> bytes:
    """The artifact's meta-data document for these exact manifest bytes."""
    return json.dumps({META_DATA_KEY: base64.b64encode(manifest).decode("ascii")}).encode()


def write_artifact(
    manifest_path: Path,
    out: Path,
    *,
    artifact_name: str | None = None,
    device_types: Sequence[str] = (),
    key: Path | None = None,
    overwrite: bool = False,
) -> Written:
    data = read_bounded(manifest_path, MAX_MANIFEST_BYTES, "manifest")
    envelope = parse_envelope(data)  # size, JSON, schema (at least one signature)
    m = envelope.manifest
    name = artifact_name or f"{m.name}-{m.version}"
    types = tuple(device_types) or m.compatible
    if key is not None:
        _check_key(key)
    if out.is_dir():
        raise WriteError(f"cannot write {out}: it is a directory")
    if out.exists() and not overwrite:
        raise WriteError(f"{out} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise WriteError(f"cannot write {out}: directory {out.parent} does not exist")
    tool = shutil.which(TOOL)
    if tool is None:
        raise MenderArtifactError(
            f"{TOOL} is not installed (Debian package mender-artifact); it writes the artifact"
        )
    document = meta_data(data)
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix="otacast-mender-"))
        try:
            # The tool writes its output by path, so it gets a directory of our own (mkdtemp:
            # created exclusively, mode 0700) beside `out` rather than a predictable name there,
            # where a planted link would have it write through to another file.
            private = stack.enter_context(
                tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent)
            )
        except OSError as exc:
            raise WriteError(f"cannot write {out}: {exc.strerror or exc}") from None
        tmp = Path(private) / "artifact.mender"
        meta_path = Path(work) / "meta-data.json"
        meta_path.write_bytes(document)
        command = [tool, "write", "module-image", "-T", PAYLOAD_TYPE, "-n", name]
        for device_type in types:
            command += ["-t", device_type]
        command += ["-m", str(meta_path), "-o", str(tmp)]
        if key is not None:
            command += ["-k", str(key)]
        try:
            _run(command)
            # mender-artifact 3.9 exits 0 without writing when it cannot read its inputs.
            if not tmp.is_file() or tmp.stat().st_size == 0:
                raise MenderArtifactError(f"{TOOL} wrote no artifact")
            tmp.replace(out)
        except OSError as exc:
            raise WriteError(f"cannot write {out}: {exc.strerror or exc}") from None
    return Written(out, name, types, envelope, len(document), key is not None)


def _run(command: list[str]) -> None:
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=TOOL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise MenderArtifactError(f"{TOOL} did not finish within {TOOL_TIMEOUT:g} s") from None
    except OSError as exc:
        raise MenderArtifactError(f"cannot run {TOOL}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1][:MAX_REASON] if lines else f"exit status {done.returncode}"
        if "PKCS8" in reason:
            reason += (
                " (mender-artifact reads PKCS#1/SEC1 keys: convert with `openssl ec -in KEY` "
                "or `openssl rsa -in KEY -traditional`)"
            )
        raise MenderArtifactError(f"{TOOL} failed: {reason}")


# The PEM blocks mender-artifact signs with: PKCS#1 RSA and SEC1 EC keys.  It refuses PKCS#8
# ("BEGIN PRIVATE KEY", which `openssl genpkey` writes) with a message about Go's x509 parser.
_MENDER_KEY_BLOCKS = (b"-----BEGIN RSA PRIVATE KEY-----", b"-----BEGIN EC PRIVATE KEY-----")


def _check_key(key: Path) -> None:
    """Refuse, with the reason, keys mender-artifact would refuse obscurely: a key of the wrong
    kind is `KeyFormatError` (exit 10), as for otacast's own key files."""
    head = read_bounded(key, MAX_KEY_FILE_BYTES, "Mender signing key")
    if head.startswith(SECRET_TAG.encode()):
        raise KeyFormatError(
            f"--key {key} is an otacast Ed25519 key; Mender signs artifacts with RSA or ECDSA "
            "P-256 only (the manifest inside is already signed with your release key)"
        )
    if b"-----BEGIN" not in head:
        raise KeyFormatError(f"--key {key} is not a PEM private key (RSA or ECDSA P-256)")
    if not any(block in head for block in _MENDER_KEY_BLOCKS):
        raise KeyFormatError(
            f"--key {key} is not a PKCS#1 RSA or SEC1 EC private key, the PEM kinds "
            "mender-artifact reads (convert a PKCS#8 key with `openssl ec -in KEY` or "
            "`openssl rsa -in KEY -traditional`)"
        )
