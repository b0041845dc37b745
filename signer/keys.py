"""Ed25519 release keys (the only PyNaCl user on the publisher side).

Secret keys are written with mode 0600 and refused on load if group or others may read them:
a key that others could have copied must not sign releases.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

from otacast.schemas import keyfile

from .errors import InsecureKeyFile, ReadError, WriteError
from .fileio import atomic_write, read_bounded


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
    if not overwrite:
        for path in (secret_path, public_path):
            if path.exists():
                raise WriteError(f"{path} exists; pass --force to replace it")
    atomic_write(secret_path, keyfile.format_secret(key.seed, comment).encode(), mode=0o600)
    atomic_write(public_path, keyfile.format_public(key.public, comment).encode(), mode=0o644)
    return secret_path, public_path


def load_secret(path: Path) -> SigningKey:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ReadError(f"cannot read secret key {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InsecureKeyFile(
            f"secret key {path} is accessible by other users (mode {stat.S_IMODE(mode):04o}); "
            f"it may have been copied. Run: chmod 600 {path}"
        )
    data = read_bounded(path, keyfile.MAX_KEY_FILE_BYTES, "secret key")
    return SigningKey(keyfile.parse_secret(data, str(path)))


def load_public(path: Path) -> bytes:
    data = read_bounded(path, keyfile.MAX_KEY_FILE_BYTES, "public key")
    return keyfile.parse_public(data, str(path))
