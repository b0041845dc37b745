"""Rotating and revoking the device's release keys with signed trust-set documents."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otacast.plugin.cli import main
from otacast.plugin.errors import StateError
from otacast.plugin.trust import TRUST_RECORD, accept_rotation, current_trust
from otacast.plugin.verify import check_signature, verify_manifest
from otacast.schemas import keyfile
from otacast.schemas.errors import UnknownKey
from otacast.schemas.policy import TrustSet
from otacast.schemas.trustset import (
    TRUST_CONTEXT,
    SignedTrust,
    TrustSetRejected,
    check_rotation,
    parse_trust,
    unsigned,
)
from otacast.signer.keys import SigningKey
from otacast.signer.sign import sign

from .helpers import manifest_for, untimed

OLD, SPARE, NEW = (SigningKey(bytes([i]) * 32) for i in (1, 2, 3))
NOW = 1_800_000_000.0
LATER = 1_900_000_000


def signed_by(document: SignedTrust, *keys: SigningKey) -> SignedTrust:
    for key in keys:
        document = document.with_signature(key.key_id, key.sign(document.document.signing_message))
    return document


def rotation(*keys: SigningKey, to: tuple[SigningKey, ...] = (NEW,), version: int = 1) -> bytes:
    document = unsigned([k.public for k in to], 1, version, LATER)
    return signed_by(document, *keys).to_bytes()


def trust_of(*keys: SigningKey, threshold: int = 1) -> TrustSet:
    return TrustSet.from_public_keys([k.public for k in keys], threshold)


def test_rotation_signed_by_the_old_and_the_new_key_is_accepted() -> None:
    new = check_rotation(
        parse_trust(rotation(OLD, NEW)), trust_of(OLD), 0, check_signature, now=NOW
    )
    assert set(new.keys) == {NEW.key_id}


@pytest.mark.parametrize(
    ("signers", "current", "message"),
    [
        ((NEW,), trust_of(OLD), "signed by 0 of the currently trusted keys, 1 required"),
        ((OLD,), trust_of(OLD), "signed by 0 of its own keys, 1 required"),
        ((OLD, NEW), trust_of(OLD, SPARE, threshold=2), "1 of the currently trusted keys, 2"),
    ],
)
def test_rotation_without_both_thresholds_is_refused(
    signers: tuple[SigningKey, ...], current: TrustSet, message: str
) -> None:
    with pytest.raises(TrustSetRejected, match=message):
        check_rotation(parse_trust(rotation(*signers)), current, 0, check_signature, now=NOW)


def test_replayed_older_or_expired_rotation_is_refused() -> None:
    document = parse_trust(rotation(OLD, NEW, version=2))
    with pytest.raises(TrustSetRejected, match="version 2 is not above the version in force"):
        check_rotation(document, trust_of(OLD), 2, check_signature, now=NOW)
    with pytest.raises(TrustSetRejected, match="expired"):
        check_rotation(document, trust_of(OLD), 0, check_signature, now=LATER)


def test_a_release_signature_cannot_be_replayed_as_a_trust_signature() -> None:
    document = unsigned([NEW.public], 1, 1, LATER)
    message = document.document.signing_message
    assert message.startswith(TRUST_CONTEXT)
    forged = document.with_signature(OLD.key_id, OLD.sign(message[len(TRUST_CONTEXT) :]))
    forged = signed_by(forged, NEW)
    with pytest.raises(TrustSetRejected, match="0 of the currently trusted"):
        check_rotation(forged, trust_of(OLD), 0, check_signature, now=NOW)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("signatures"), "exactly the fields"),
        (lambda d: d["signed"].update(_type="otacast-manifest"), "_type"),
        (lambda d: d["signed"].update(version="2"), "integers"),
        (lambda d: d["signed"].update(threshold=5), "threshold must be between"),
        (lambda d: d["signed"].update(keys=[]), "1 to 16 keys"),
        (lambda d: d["signed"]["keys"].append(d["signed"]["keys"][0]), "each key once"),
        (lambda d: d["signed"].update(keys=["AB" * 32]), "hex public keys"),
        (lambda d: d["signed"].update(extra=1), "exactly the fields"),
        (lambda d: d["signatures"][0].update(sig="00"), "lowercase hex"),
    ],
)
def test_malformed_trust_documents_are_refused_with_the_reason(
    mutate: object, message: str
) -> None:
    document = json.loads(rotation(OLD, NEW))
    mutate(document)  # type: ignore[operator]
    with pytest.raises(TrustSetRejected, match=message):
        parse_trust(json.dumps(document).encode())


@given(st.binary(max_size=600))
def test_arbitrary_bytes_are_refused_never_raised_otherwise(data: bytes) -> None:
    with contextlib.suppress(TrustSetRejected):
        assert isinstance(parse_trust(data), SignedTrust)


def test_parse_and_build_are_symmetric() -> None:
    data = rotation(OLD, NEW)
    assert parse_trust(data).to_bytes() == data


def write_key(path: Path, key: SigningKey) -> Path:
    path.write_text(keyfile.format_public(key.public))
    return path


def test_revoked_key_is_refused_after_the_device_applies_a_rotation(tmp_path: Path) -> None:
    old_pub = write_key(tmp_path / "old.pub", OLD)
    state = tmp_path / "state"
    accept_rotation(state, [old_pub], 1, rotation(OLD, NEW), now=NOW)
    trust, version = current_trust(state, [old_pub], 1)
    assert version == 1 and set(trust.keys) == {NEW.key_id}
    release_by_old = sign(manifest_for(b"x" * 70000), [OLD]).compact_bytes
    with pytest.raises(UnknownKey):
        verify_manifest(
            release_by_old, trust, now=NOW, device_type=None, installed_sequence=None, channel=None
        )
    release_by_new = sign(manifest_for(b"x" * 70000), [NEW]).compact_bytes
    verify_manifest(
        release_by_new, trust, now=NOW, device_type=None, installed_sequence=None, channel=None
    )
    # The old key can no longer rotate trust back to itself.
    with pytest.raises(TrustSetRejected):
        accept_rotation(state, [old_pub], 1, rotation(OLD, to=(OLD,), version=2), now=NOW)


def test_a_damaged_trust_record_is_an_error_not_a_silent_reset(tmp_path: Path) -> None:
    old_pub = write_key(tmp_path / "old.pub", OLD)
    (tmp_path / TRUST_RECORD).write_text("{")
    with pytest.raises(StateError, match="damaged"):
        current_trust(tmp_path, [old_pub], 1)


def test_operator_cli_rotates_and_then_refuses_the_revoked_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old_pub = write_key(tmp_path / "old.pub", OLD)
    document = tmp_path / "trust-v1.json"
    document.write_bytes(rotation(OLD, NEW))
    common = ["--trust", str(old_pub), "--state-dir", str(tmp_path / "state")]
    assert main(["trust", "update", str(document), *common, "--json"]) == 0
    assert untimed(json.loads(capsys.readouterr().out)) == {
        "version": 1,
        "threshold": 1,
        "keys": [NEW.key_id],
    }
    assert main(["trust", "update", str(document), *common]) == TrustSetRejected.exit_code
    assert "not above the version in force" in capsys.readouterr().err
    assert main(["trust", "show", *common]) == 0
    assert "rotation version 1" in capsys.readouterr().out
    assert main(["trust", "update", *common]) == 2


def test_publisher_makes_and_cosigns_a_rotation_that_devices_apply(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from otacast.signer.cli import main as signer

    for name in ("old", "new"):
        assert signer(["keygen", str(tmp_path / name)]) == 0
    document = tmp_path / "trust-v1.json"
    made = ["trust-set", str(document), "--public", str(tmp_path / "new.pub"), "--version", "1"]
    assert signer([*made, "--key", str(tmp_path / "old.key")]) == 0
    device = ["--trust", str(tmp_path / "old.pub"), "--state-dir", str(tmp_path / "state")]
    # Only the old key signed: the new holder has not proven their key yet.
    assert main(["trust", "update", str(document), *device]) == TrustSetRejected.exit_code
    assert "of its own keys" in capsys.readouterr().err
    cosign = ["trust-set", str(document), "--cosign", "--key", str(tmp_path / "new.key")]
    assert signer(cosign) == 0
    assert main(["trust", "update", str(document), *device]) == 0
    capsys.readouterr()
    # A release signed by the revoked old key is now refused by the device.
    image = tmp_path / "img"
    image.write_bytes(b"i" * 70000)
    release = [
        "sign",
        str(image),
        "--sequence",
        "1",
        "--channel",
        "u.example.test",
        "--device-type",
        "b",
        "--key",
    ]
    assert signer([*release, str(tmp_path / "old.key")]) == 0
    manifest = tmp_path / "img.manifest.json"
    assert main(["verify", str(manifest), *device]) == UnknownKey.exit_code
    assert signer([*release, str(tmp_path / "new.key"), "--force"]) == 0
    assert main(["verify", str(manifest), *device]) == 0
    assert signer([*made, "--key", str(tmp_path / "old.key")]) == 13  # exists: --force needed
