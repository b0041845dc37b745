"""`publish` lays out files where the signed mirror URLs point; `dns-records` renders SRV/AAAA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from otacast.schemas.errors import ImageMismatch
from otacast.signer import publish
from otacast.signer.errors import UsageError
from otacast.signer.keys import SigningKey
from otacast.signer.sign import sign

from .helpers import manifest_for

SIGNER = str(Path(sys.executable).parent / "otacast-signer")


def release(tmp_path: Path, urls: tuple[str, ...]) -> tuple[Path, Path]:
    image = os.urandom(200_000)
    manifest = manifest_for(image)
    manifest = type(manifest)(**{**manifest.__dict__, "http": urls})
    envelope = sign(manifest, [SigningKey(b"\x02" * 32)])
    (tmp_path / "demo.img").write_bytes(image)
    (tmp_path / "demo.json").write_bytes(envelope.to_file_bytes())
    return tmp_path / "demo.json", tmp_path / "demo.img"


def test_publish_places_image_and_manifest_at_every_mirror_path(tmp_path: Path) -> None:
    manifest, image = release(
        tmp_path, ("https://cdn.example.test/fw/42/demo.img", "http://[fd00::1]/mirror/demo.img")
    )
    root = tmp_path / "www"
    done = subprocess.run(
        [SIGNER, "publish", str(manifest), str(image), "--root", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for path in ("fw/42/demo.img", "mirror/demo.img"):
        assert (root / path).read_bytes() == image.read_bytes()
        assert (root / (path + ".manifest.json")).read_bytes() == manifest.read_bytes()
    assert not list(root.rglob(".*.tmp"))


def test_publish_refuses_an_image_that_does_not_match(tmp_path: Path) -> None:
    manifest, image = release(tmp_path, ("https://cdn.example.test/demo.img",))
    data = image.read_bytes()
    image.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # always a different last byte
    root = tmp_path / "www"
    done = subprocess.run(
        [SIGNER, "publish", str(manifest), str(image), "--root", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == ImageMismatch.exit_code
    assert not root.exists() or not any(root.rglob("*"))


@pytest.mark.parametrize(
    "url", ["https://cdn.example.test/", "https://cdn.example.test/a/../../etc/passwd"]
)
def test_mirror_urls_outside_the_web_root_are_refused(tmp_path: Path, url: str) -> None:
    manifest, _ = release(tmp_path, (url,))
    from otacast.schemas.manifest import parse_envelope

    with pytest.raises(UsageError):
        publish.mirror_paths(parse_envelope(manifest.read_bytes()))


def test_dns_records_name_every_source_in_zone_and_dnsmasq_form() -> None:
    sources = [
        publish.parse_source("tx1.example.test=fd77::1", "updates.example.test", 0),
        publish.parse_source("fd77:0::3", "updates.example.test", 1),
    ]
    zone = publish.dns_records("updates.example.test", 4242, sources)
    assert zone == [
        "_otacast._udp.updates.example.test. 300 IN SRV 10 10 4242 tx1.example.test.",
        "_otacast._udp.updates.example.test. 300 IN SRV 10 10 4242 sender2.updates.example.test.",
        "tx1.example.test. 300 IN AAAA fd77::1",
        "sender2.updates.example.test. 300 IN AAAA fd77::3",
    ]
    dnsmasq = publish.dns_records("updates.example.test", 4242, sources[:1], style="dnsmasq")
    assert dnsmasq == [
        "--srv-host=_otacast._udp.updates.example.test,tx1.example.test,4242,10,10",
        "--host-record=tx1.example.test,fd77::1",
    ]


@pytest.mark.parametrize("bad", ["tx=10.0.0.1", "bad..host=fd77::1", "nonsense"])
def test_bad_sources_are_refused(bad: str) -> None:
    with pytest.raises(UsageError):
        publish.parse_source(bad, "updates.example.test", 0)


def test_dns_records_command_reads_the_channel_from_the_manifest(tmp_path: Path) -> None:
    manifest, _ = release(tmp_path, ())
    done = subprocess.run(
        [SIGNER, "dns-records", str(manifest), "--source", "fd77::1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "_otacast._udp.updates.example.test. 300 IN SRV 10 10 4242 " in done.stdout
