"""Resuming without the sender: which kept downloads are continued, and why the others are not."""

from __future__ import annotations

import dataclasses
import io
import random
from pathlib import Path

import pytest

from otacast.plugin import resume as resume_module
from otacast.plugin import watch as watch_module
from otacast.plugin.config import Settings
from otacast.plugin.errors import FetchError, NoManifestError
from otacast.plugin.receive import FetchOptions
from otacast.plugin.resume import fetch_kept, kept_downloads
from otacast.plugin.staging import Staging
from otacast.plugin.watch import Watcher
from otacast.schemas.manifest import Manifest
from otacast.schemas.policy import TrustSet, VerifiedManifest
from otacast.signer.keys import SigningKey
from otacast.signer.sign import sign

from .helpers import CHANNEL, CHUNK, NOW, make_release

KEY = SigningKey(b"\x07" * 32)
TRUST = TrustSet.from_public_keys([KEY.public])
IMAGE = random.Random(3).randbytes(4 * CHUNK - 17)


def keep(state: Path, sequence: int, *, mirrors: bool = True) -> VerifiedManifest:
    """A download of `sequence` kept in `state` as an interrupted run leaves it."""
    release = make_release(IMAGE, KEY, sequence=sequence)
    envelope = release.envelope
    if not mirrors:
        manifest: Manifest = dataclasses.replace(envelope.manifest, http=())
        envelope = sign(manifest, [KEY])
    verified = VerifiedManifest(envelope, release.verified().signers)
    staging = Staging(state, verified)
    staging.write_chunk(0, IMAGE[:CHUNK])
    staging.close()
    return verified


def options(state: Path, **changes: object) -> FetchOptions:
    base = FetchOptions(
        trust=TRUST,
        out=state / "out.img",
        state_dir=state,
        channel=CHANNEL,
        device_type="raspberrypi4",
        installed_sequence=2,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_the_highest_kept_sequence_that_verifies_comes_first(tmp_path: Path) -> None:
    for sequence in (4, 6, 5):
        keep(tmp_path, sequence)
    usable, refused = kept_downloads(options(tmp_path), NOW)
    assert [k.verified.manifest.sequence for k in usable] == [6, 5, 4]
    assert refused == []


def test_a_kept_manifest_at_or_below_the_installed_sequence_is_not_continued(
    tmp_path: Path,
) -> None:
    keep(tmp_path, 4)
    usable, refused = kept_downloads(options(tmp_path, installed_sequence=4), NOW)
    assert usable == []
    assert len(refused) == 1
    assert "is not continued: manifest sequence 4 is not above the installed 4" in refused[0]


def test_an_expired_kept_manifest_is_not_continued(tmp_path: Path) -> None:
    verified = keep(tmp_path, 4)
    later = float(verified.manifest.expires)
    usable, refused = kept_downloads(options(tmp_path), later)
    assert usable == []
    assert "is not continued: manifest expired" in refused[0]


def test_a_kept_manifest_of_another_channel_or_device_type_is_not_continued(
    tmp_path: Path,
) -> None:
    keep(tmp_path, 4)
    usable, refused = kept_downloads(options(tmp_path, channel="beta.example.test"), NOW)
    assert usable == [] and "is for channel" in refused[0]
    usable, refused = kept_downloads(options(tmp_path, device_type="otherboard"), NOW)
    assert usable == [] and "device type 'otherboard' is not among" in refused[0]


def test_a_kept_manifest_is_checked_against_the_trust_set_in_force_not_trusted_for_being_kept(
    tmp_path: Path,
) -> None:
    keep(tmp_path, 4)
    rotated = TrustSet.from_public_keys([SigningKey(b"\x08" * 32).public])
    usable, refused = kept_downloads(options(tmp_path, trust=rotated), NOW)
    assert usable == [] and "is not continued" in refused[0]
    # Altered on disk: refused by its signature, whatever it now says.
    (path,) = tmp_path.glob("*/manifest.json")
    data = path.read_bytes()
    altered = data.replace(b'"sequence": 4', b'"sequence": 9')
    assert altered != data
    path.write_bytes(altered)
    usable, refused = kept_downloads(options(tmp_path), NOW)
    assert usable == [] and "is not continued" in refused[0]


def test_without_a_channel_or_with_fallback_never_nothing_kept_is_used(tmp_path: Path) -> None:
    keep(tmp_path, 4)
    for changes in ({"channel": None}, {"fallback": "never"}):
        out = io.StringIO()
        assert fetch_kept(options(tmp_path, **changes), out, "why") is None
        assert out.getvalue() == ""


def test_a_kept_manifest_without_mirrors_is_not_continued_and_says_so(tmp_path: Path) -> None:
    keep(tmp_path, 4, mirrors=False)
    out = io.StringIO()
    assert fetch_kept(options(tmp_path), out, "why") is None
    (line,) = out.getvalue().splitlines()
    assert line.endswith("is not continued: its manifest lists no HTTP mirror")


def test_a_quiet_watch_turn_continues_the_kept_download_from_its_mirrors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`watch` hears nothing for a turn: the kept download goes on over HTTP (here the mirror
    fails, so the turn fails and is retried later; the download stays kept)."""
    state = tmp_path / "state"
    keep(state, 4)
    keep(state, 6)
    continued: list[FetchOptions] = []

    def quiet_channel(options: FetchOptions, out: object) -> None:
        raise NoManifestError("no manifest heard")

    def mirrors_down(options: FetchOptions, out: object) -> None:
        continued.append(options)
        raise FetchError("mirror down")

    monkeypatch.setattr(watch_module, "fetch", quiet_channel)
    monkeypatch.setattr(resume_module, "fetch", mirrors_down)
    monkeypatch.setattr(watch_module, "RETRY_MIN", 0.0)
    settings = Settings(trust=(), state_dir=state, interface="eth0", channel=CHANNEL)
    out = io.StringIO()
    watcher = Watcher(settings, TRUST, object(), out)  # type: ignore[arg-type]
    watcher.turn()
    assert watcher.turns == {"failed": 1}
    (options,) = continued
    assert options.manifest is not None and options.manifest.manifest.sequence == 6
    assert options.fallback == "only"
    assert "nothing heard on the channel within 60 s: continuing demo-image 1.0.6" in out.getvalue()
