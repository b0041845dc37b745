"""Ed25519 release keys (the only PyNaCl user on the publisher side).

Secret keys are written with mode 0600 and refused on load if group or others may read them:
a key that others could have copied must not sign releases.
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

from otacast.schemas import keyfile

from .errors import InsecureKeyFile, ReadError
from .fileio import atomic_write_all, read_bounded


@dataclass(frozen=True)
class SigningKey:
    seed: bytes

    @property
    def public(self) -> bytes:
        return bytes(nacl.signing.SigningKey(self.seed).verify_key)

    @property
    def key_id(self) -> str:
        return keyfile.key_id(self.public)

    def sign(self, message: bytes) -> bytes:
        return nacl.signing.SigningKey(self.seed).sign(message).signature

    def signer(self) -> Callable[[bytes], bytes]:
        """`sign` without re-deriving the key each call (for signing many AUTH pages)."""
        key = nacl.signing.SigningKey(self.seed)
        return lambda message: key.sign(message).signature


def generate() -> SigningKey:
    return SigningKey(bytes(nacl.signing.SigningKey.generate()))


def check_signature(public: bytes, message: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError, TypeError):
        return False
    return True


def write_keypair(key: SigningKey, base: Path, *, overwrite: bool) -> tuple[Path, Path]:
    secret_path = base.with_name(base.name + ".key")
    public_path = base.with_name(base.name + ".pub")
    comment = f"keyid={key.key_id}"
    # The secret key is renamed into place last: whatever fails, an old secret key survives.
    atomic_write_all(
        [
            (public_path, keyfile.format_public(key.public, comment).encode(), 0o644),
            (secret_path, keyfile.format_secret(key.seed, comment).encode(), 0o600),
        ],
        overwrite=overwrite,
    )
    return secret_path, public_path


def load_secret(path: Path) -> SigningKey:
    # What the file is comes first: a public key given by mistake is a mix-up, not a leak.
    data = read_bounded(path, keyfile.MAX_KEY_FILE_BYTES, "secret key")
    seed = keyfile.parse_secret(data, str(path))
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ReadError(f"cannot read secret key {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InsecureKeyFile(
            f"secret key {path} is accessible by other users (mode {stat.S_IMODE(mode):04o}); "
            f"it may have been copied. Run: chmod 600 {path}"
        )
    return SigningKey(seed)


def load_public(path: Path) -> bytes:
    data = read_bounded(path, keyfile.MAX_KEY_FILE_BYTES, "public key")
    return keyfile.parse_public(data, str(path))
