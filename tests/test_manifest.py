"""The manifest model: symmetric JSON, canonical bytes, golden signed envelope, schema limits."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otacast.plugin.verify import check_signature
from otacast.schemas import fec, limits
from otacast.schemas.canonical import canonical_bytes, loads_strict
from otacast.schemas.errors import MalformedManifest
from otacast.schemas.keyfile import key_id
from otacast.schemas.manifest import (
    Chunking,
    Envelope,
    FecInfo,
    ImageInfo,
    Manifest,
    Signature,
    StreamKey,
    Transport,
    parse_envelope,
    signing_message,
)
from otacast.schemas.validation import schema_document
from otacast.signer.keys import SigningKey
from otacast.signer.sign import sign

from .helpers import manifest_for

GOLDEN = Path(__file__).parent / "golden"
# The golden envelope was signed with the Ed25519 seed 32 x 0x01 (a test-only key).
GOLDEN_PUBLIC = bytes.fromhex("8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c")

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+:-]{0,20}", fullmatch=True)
hashes = st.binary(min_size=32, max_size=32)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    symbol_size = draw(st.integers(256, 1212)) // 8 * 8
    chunk_size = fec.choose_chunk_size(
        1, draw(st.integers(limits.MIN_CHUNK_BYTES, limits.MAX_CHUNK_BYTES)), symbol_size
    )
    length = draw(st.integers(1, 6 * chunk_size))
    count = fec.chunk_count(length, chunk_size, symbol_size)
    created = draw(st.integers(0, 2**33))
    return Manifest(
        name=draw(names),
        sequence=draw(st.integers(1, 2**53 - 1)),
        version=draw(st.from_regex(r"[\x21-\x7e]{1,20}", fullmatch=True)),
        created=created,
        expires=created + draw(st.integers(1, 2**30)),
        compatible=tuple(draw(st.lists(names, min_size=1, max_size=4, unique=True))),
        image=ImageInfo(
            draw(st.from_regex(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,20}", fullmatch=True)),
            length,
            draw(hashes),
            draw(st.sampled_from(["raw", "mender", "swu"])),
        ),
        chunks=Chunking(chunk_size, tuple(draw(st.lists(hashes, min_size=count, max_size=count)))),
        fec=FecInfo(symbol_size=symbol_size),
        transport=Transport.for_channel(
            draw(st.from_regex(r"[a-z][a-z0-9]{0,10}(\.[a-z][a-z0-9]{0,10}){0,3}", fullmatch=True)),
            scope=draw(st.sampled_from(["link", "site", "org", "global"])),
            port=draw(st.integers(1, 65535)),
            rates=tuple(draw(st.lists(st.integers(1000, 10**11), max_size=3))),
        ),
        http=tuple(
            draw(
                st.lists(
                    st.from_regex(r"https?://[a-z.]{1,20}/[a-z0-9./]{0,20}", fullmatch=True),
                    max_size=3,
                    unique=True,
                )
            )
        ),
        stream_keys=tuple(
            StreamKey(i, k) for i, k in enumerate(draw(st.lists(hashes, max_size=3)))
        ),
    )


@given(
    manifests(),
    st.lists(st.tuples(hashes, st.binary(min_size=64, max_size=64)), min_size=1, max_size=3),
)
def test_manifest_round_trips_through_json_and_the_parser(
    manifest: Manifest, sigs: list[tuple[bytes, bytes]]
) -> None:
    envelope = Envelope(manifest, tuple(Signature(k.hex(), s) for k, s in sigs))
    assert Manifest.from_json(manifest.to_json()) == manifest
    for data in (envelope.compact_bytes, envelope.to_file_bytes()):
        parsed = parse_envelope(data)
        assert parsed == envelope
        assert parsed.manifest.signed_bytes == manifest.signed_bytes
        assert parsed.manifest.session_id == manifest.session_id


@given(manifests())
def test_canonical_bytes_are_sorted_compact_utf8(manifest: Manifest) -> None:
    data = manifest.signed_bytes
    assert (
        data
        == json.dumps(
            json.loads(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    )
    assert b" " not in data.replace(b'" "', b"")  # no insignificant whitespace


def test_golden_envelope_still_parses_verifies_and_renders_identically() -> None:
    data = (GOLDEN / "manifest.json").read_bytes()
    envelope = parse_envelope(data)
    assert envelope.to_file_bytes() == data
    assert envelope.signatures[0].keyid == key_id(GOLDEN_PUBLIC)
    assert check_signature(
        GOLDEN_PUBLIC, signing_message(envelope.manifest), envelope.signatures[0].sig
    )
    assert envelope.manifest.signed_bytes == (GOLDEN / "manifest.signed-bytes").read_bytes()
    assert envelope.manifest.session_id.hex() == (GOLDEN / "manifest.session").read_text().strip()


def test_golden_envelope_is_what_its_recipe_signs() -> None:
    # Recipe of tests/golden/manifest.*: 150000 seeded bytes in the RFC 6330 layout (3 chunks
    # of 42, 42 and 41 symbols), sequence 3, signed by the key of seed 0x01.
    image = random.Random(150000).randbytes(150000)
    envelope = sign(manifest_for(image, sequence=3), [SigningKey(b"\x01" * 32)])
    assert envelope.to_file_bytes() == (GOLDEN / "manifest.json").read_bytes()


def test_a_manifest_of_the_previous_format_is_refused_naming_both_versions() -> None:
    # tests/golden/manifest-v1.json: a genuine envelope of otacast wire 2 (chunks of 64 KiB).
    with pytest.raises(MalformedManifest) as refused:
        parse_envelope((GOLDEN / "manifest-v1.json").read_bytes())
    assert "format version 1 (otacast wire 2)" in str(refused.value)
    assert "FLUTE/ALC (otacast wire 3)" in str(refused.value)


def test_session_id_changes_with_any_signed_field() -> None:
    base = manifest_for(b"x" * 100_000)
    other = manifest_for(b"x" * 100_000, sequence=2)
    assert base.session_id != other.session_id
    assert len(base.session_id) == 8


def test_adding_a_signature_keeps_the_session_but_changes_the_envelope_id() -> None:
    manifest = manifest_for(b"y" * 70_000)
    one = Envelope(manifest, (Signature("aa" * 32, bytes(64)),))
    two = one.with_signature(Signature("bb" * 32, bytes(64)))
    assert one.manifest.session_id == two.manifest.session_id
    assert one.envelope_id != two.envelope_id


def test_chunk_spans_are_the_rfc_6330_partition_of_the_image() -> None:
    # 3 chunks of 55 symbols and 5 bytes: Kt = 166, Z = ceil(166 / 55) = 4, and
    # Partition[166, 4] = (KL 42, KS 41, ZL 2, ZS 2).
    t = 1208
    manifest = manifest_for(bytes(55 * t * 3 + 5), chunk_size=55 * t)
    spans = [manifest.chunk_span(i) for i in range(manifest.chunk_count)]
    assert spans == [(0, 42 * t), (42 * t, 42 * t), (84 * t, 41 * t), (125 * t, 40 * t + 5)]
    assert [manifest.source_symbols(i) for i in range(4)] == [42, 42, 41, 41]
    assert manifest.part_count == 1


def test_an_image_beyond_255_chunks_is_cut_into_objects_of_255_full_chunks() -> None:
    t, size = 256, 65536
    manifest = manifest_for(bytes(255 * size + 3 * t + 1), chunk_size=size, symbol_size=t)
    assert manifest.part_count == 2
    assert manifest.chunk_count == 256
    assert manifest.chunk_span(254) == (254 * size, size)
    assert manifest.chunk_span(255) == (255 * size, 3 * t + 1)
    assert manifest.part(1).offset == 255 * size
    assert manifest.part(1).first_chunk == 255


def test_schema_bounds_equal_the_named_limits() -> None:
    schema = schema_document()
    signed = schema["properties"]["signed"]["properties"]
    assert schema["properties"]["signatures"]["maxItems"] == limits.MAX_SIGNATURES
    assert signed["image"]["properties"]["length"]["maximum"] == limits.MAX_IMAGE_BYTES
    assert signed["chunks"]["properties"]["size"]["minimum"] == limits.MIN_CHUNK_BYTES
    assert signed["chunks"]["properties"]["size"]["maximum"] == limits.MAX_CHUNK_BYTES
    assert signed["chunks"]["properties"]["sha256"]["maxItems"] == limits.MAX_CHUNKS
    assert signed["compatible"]["maxItems"] == limits.MAX_COMPATIBLE
    assert signed["http"]["maxItems"] == limits.MAX_MIRRORS
    assert signed["transport"]["properties"]["rates"]["maxItems"] == limits.MAX_RATE_CHANNELS
    assert signed["stream_keys"]["maxItems"] == limits.MAX_STREAM_KEYS
    fec = signed["fec"]["properties"]["symbol_size"]
    assert fec["minimum"] == limits.MIN_SYMBOL_SIZE
    assert fec["multipleOf"] == limits.SYMBOL_ALIGNMENT
    assert fec["maximum"] == (limits.MAX_DATAGRAM - 20) // 8 * 8


def test_largest_legal_manifest_fits_the_manifest_size_cap() -> None:
    image_length = limits.MAX_CHUNKS * limits.MAX_CHUNK_BYTES
    signed = manifest_for(b"z" * 70_000).to_json()
    signed["image"]["length"] = min(image_length, limits.MAX_IMAGE_BYTES)
    signed["chunks"]["size"] = limits.MAX_CHUNK_BYTES
    signed["chunks"]["sha256"] = ["ab" * 32] * limits.MAX_CHUNKS
    signed["http"] = ["https://" + "m" * 2000 + f"/{i}" for i in range(limits.MAX_MIRRORS)]
    signed["compatible"] = [f"device-type-{i:03d}" + "x" * 100 for i in range(64)]
    envelope = {"signed": signed, "signatures": [{"keyid": "ab" * 32, "sig": "cd" * 64}] * 16}
    assert len(json.dumps(envelope, indent=2)) < limits.MAX_MANIFEST_BYTES


@pytest.mark.parametrize(
    "text",
    ['{"a": 1, "a": 2}', '{"a": 1.5}', '{"a": NaN}', '{"a": Infinity}', "[1e3]", "\ufeff{}"],
)
def test_strict_json_refuses_ambiguous_documents(text: str) -> None:
    with pytest.raises(MalformedManifest):
        loads_strict(text.encode())


def test_canonical_bytes_refuse_floats() -> None:
    with pytest.raises(MalformedManifest):
        canonical_bytes({"a": 1.0})


def test_a_schema_error_on_a_long_value_still_names_the_rule_it_breaks() -> None:
    from otacast.schemas.validation import validate_envelope
    from otacast.signer.keys import SigningKey
    from otacast.signer.sign import sign

    from .helpers import manifest_for

    document = json.loads(
        sign(manifest_for(b"x" * 70000), [SigningKey(b"\x01" * 32)]).to_file_bytes()
    )
    document["signed"]["chunks"]["sha256"] = ["00" * 32] * 16385
    with pytest.raises(MalformedManifest) as caught:
        validate_envelope(document)
    message = str(caught.value)
    assert message.endswith("is too long") and len(message) < 250
