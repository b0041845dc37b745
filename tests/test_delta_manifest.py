"""The signed manifest's `delta` field: round trip, schema bounds, refusals."""

from __future__ import annotations

import dataclasses

import pytest

from otacast.schemas import limits
from otacast.schemas.errors import MalformedManifest
from otacast.schemas.manifest import DeltaFrom, DeltaInfo, parse_envelope
from otacast.schemas.validation import schema_document
from otacast.signer.sign import sign

from .test_index_delivery import KEY, RELEASE


def _delta(**changes: object) -> DeltaInfo:
    base = DeltaInfo(
        length=4096,
        sha256=bytes(range(32)),
        blocks=3,
        sources=(
            DeltaFrom(
                sequence=1, index_sha256=b"\x01" * 32, patch_length=200, patch_sha256=b"\x02" * 32
            ),
        ),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_a_delta_field_round_trips_through_the_signed_envelope() -> None:
    manifest = dataclasses.replace(RELEASE.manifest, sequence=5, delta=_delta())
    parsed = parse_envelope(sign(manifest, [KEY]).compact_bytes).manifest
    assert parsed.delta == manifest.delta
    assert parsed == manifest


def test_a_manifest_without_delta_has_no_delta_key() -> None:
    assert "delta" not in RELEASE.manifest.to_json()
    assert parse_envelope(sign(RELEASE.manifest, [KEY]).compact_bytes).manifest.delta is None


@pytest.mark.parametrize(
    ("delta", "index", "reason"),
    [
        (_delta(), False, "needs the release's block index"),
        (_delta(blocks=10**6), True, "smaller image"),
        (_delta(sources=()), True, None),
        (
            _delta(sources=_delta().sources * 2),
            True,
            "distinct releases older",
        ),
        (
            _delta(sources=(dataclasses.replace(_delta().sources[0], sequence=5),)),
            True,
            "distinct releases older",
        ),
    ],
)
def test_an_inconsistent_delta_field_is_refused(
    delta: DeltaInfo, index: bool, reason: str | None
) -> None:
    manifest = dataclasses.replace(
        RELEASE.manifest,
        sequence=5,
        delta=delta,
        index=RELEASE.manifest.index if index else None,
    )
    with pytest.raises(MalformedManifest, match=reason):
        parse_envelope(sign(manifest, [KEY]).compact_bytes)


def test_schema_bound_on_listed_releases_equals_the_named_limit() -> None:
    signed = schema_document()["properties"]["signed"]["properties"]
    assert signed["delta"]["properties"]["from"]["maxItems"] == limits.MAX_DELTA_FROM
