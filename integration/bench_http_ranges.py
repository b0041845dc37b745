"""Bytes and requests HTTP repair needs for a device holding an older image and reaching only
mirrors (issue 15, Build 4), for several gap thresholds of `otacast.plugin.fetcher.plan_ranges`.

For each chunk of the new image (the signer's default layout: 1208-byte symbols, 8 MiB chunks)
it takes the source symbols the local pass would know from the old image (the device's own
functions: `scan_source`, `known_symbols`), as the receive driver does with ``--fallback only``:
a chunk with every symbol known is completed locally, one with none is fetched whole, and one
partly known is fetched as the ranges `plan_ranges` gives (before this build: whole).  What it
prints is the sum over chunks of those bytes and requests: what a mirrors-only run fetches of
the image (the integration test measures the same through nginx for the 96 MiB pair).

    python integration/bench_http_ranges.py OLD.img NEW.img [OLD2.img NEW2.img ...]
    python integration/bench_http_ranges.py --test-pair   # test_reuse's 96 MiB ext4 pair
    make bench-http-ranges   # the test pair, and bench_delta's cached 1200 MiB small, medium

No network, no root; the page cache makes a second run CPU-bound (about 3 s per GB scanned).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.test_reuse import _ext4, _index, build_trees, known_per_chunk
from otacast.plugin.fetcher import RANGE_GAP, plan_ranges
from otacast.plugin.reuse import Layout
from otacast.schemas import fec
from otacast.schemas.fec import DEFAULT_SYMBOL_SIZE
from otacast.schemas.limits import DEFAULT_CHUNK_BYTES, MAX_RANGES_PER_CHUNK

GAPS = (0, 4 * 1024, RANGE_GAP, 64 * 1024, 256 * 1024)


def known_runs(old: Path, new: Path) -> tuple[Layout, list[list[tuple[int, int]]]]:
    """The new image's layout and, per chunk, the runs of source ESIs known from `old`."""
    length = new.stat().st_size
    chunk = fec.choose_chunk_size(length, DEFAULT_CHUNK_BYTES, DEFAULT_SYMBOL_SIZE)
    layout = Layout(length, chunk, DEFAULT_SYMBOL_SIZE)
    runs: list[list[tuple[int, int]]] = []
    for esis in known_per_chunk(layout, _index(new), old):
        chunk_runs: list[tuple[int, int]] = []
        for esi in esis:
            if chunk_runs and chunk_runs[-1][1] == esi:
                chunk_runs[-1] = (chunk_runs[-1][0], esi + 1)
            else:
                chunk_runs.append((esi, esi + 1))
        runs.append(chunk_runs)
    return layout, runs


def measure(old: Path, new: Path) -> None:
    started = time.perf_counter()
    layout, runs = known_runs(old, new)
    seconds = time.perf_counter() - started
    total = layout.length
    k = [fec.source_symbols(layout.chunk_span(i)[1], layout.symbol_size) for i in range(len(runs))]
    local = sum(1 for i, r in enumerate(runs) if r == [(0, k[i])])
    partly = sum(1 for i, r in enumerate(runs) if r and r != [(0, k[i])])
    print(
        f"\n{old.name} -> {new.name}: {total:,} bytes, {layout.chunks} chunks "
        f"({local} all local, {partly} partly, {layout.chunks - local - partly} none); "
        f"scan {seconds:.1f} s"
    )
    missing = sum(
        min((e + 1) * layout.symbol_size, layout.chunk_span(i)[1]) - e * layout.symbol_size
        for i, chunk_runs in enumerate(runs)
        for e in set(range(k[i])) - {e for a, b in chunk_runs for e in range(a, b)}
    )
    print(f"missing source symbols' bytes (the least any plan fetches): {missing:,}")
    print("| plan | bytes over HTTP | % of image | requests | max per chunk |")
    print("|---|---|---|---|---|")
    whole = sum(layout.chunk_span(i)[1] for i, r in enumerate(runs) if r != [(0, k[i])])
    requests = sum(1 for i, r in enumerate(runs) if r != [(0, k[i])])
    print(f"| whole chunks (before) | {whole:,} | {100 * whole / total:.2f}% | {requests} | 1 |")
    for gap in GAPS:
        fetched = requests = most = 0
        for i, chunk_runs in enumerate(runs):
            length = layout.chunk_span(i)[1]
            plan = plan_ranges(length, layout.symbol_size, chunk_runs, gap=gap)
            fetched += sum(end - start for start, end in plan)
            requests += len(plan)
            most = max(most, len(plan))
        label = f"ranges, gap {gap // 1024} KiB" + (" (default)" if gap == RANGE_GAP else "")
        print(
            f"| {label} | {fetched:,} | {100 * fetched / total:.2f}% | {requests} | "
            f"{most} (cap {MAX_RANGES_PER_CHUNK}) |"
        )


def test_pair(work: Path) -> tuple[Path, Path]:
    build_trees(work / "t1", work / "t2")
    _ext4(work / "t1", work / "v1.img")
    _ext4(work / "t2", work / "v2.img")
    return work / "v1.img", work / "v2.img"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*", type=Path, help="pairs: OLD NEW [OLD NEW ...]")
    parser.add_argument("--test-pair", action="store_true", help="test_reuse's 96 MiB pair")
    args = parser.parse_args(argv)
    if len(args.images) % 2 or not (args.images or args.test_pair):
        parser.error("give OLD NEW pairs, or --test-pair")
    pairs = list(zip(args.images[::2], args.images[1::2], strict=True))
    with tempfile.TemporaryDirectory(prefix="otacast-ranges-", dir="/var/tmp") as work:
        if args.test_pair:
            pairs.insert(0, test_pair(Path(work)))
        for old, new in pairs:
            measure(old, new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
