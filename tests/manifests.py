"""Shared builders for manifests in tests (pure, deterministic)."""

from __future__ import annotations

import hashlib

from otacast.schemas import fec
from otacast.schemas.manifest import Chunking, FecInfo, ImageInfo, Manifest, Transport

CHANNEL = "updates.example.test"


def manifest_for(image: bytes, *, sequence: int = 1, chunk_size: int = 65536) -> Manifest:
    chunks = tuple(
        hashlib.sha256(image[i : i + chunk_size]).digest() for i in range(0, len(image), chunk_size)
    )
    return Manifest(
        name="demo-image",
        sequence=sequence,
        version=f"1.0.{sequence}",
        created=1_700_000_000,
        expires=1_900_000_000,
        compatible=("raspberrypi4", "qemux86-64"),
        image=ImageInfo("demo.img", len(image), hashlib.sha256(image).digest(), "raw"),
        chunks=Chunking(chunk_size, chunks),
        fec=FecInfo(symbol_size=fec.DEFAULT_SYMBOL_SIZE),
        transport=Transport.for_channel(CHANNEL, rates=(12_500_000,)),
        http=("https://mirror.example.test/demo.img",),
    )
