"""Delta delivery size benchmark (issue 15): prints numbers, asserts nothing; not run by CI.

    python integration/bench_delta.py [--quick] [--cache DIR] [--results DIR] [--no-tools]

Builds ext4 images the way the design note measured them (``mke2fs -q -t ext4 -b 4096 -d TREE
IMG SIZE``) from hard-linked copies of trees on this machine, once: they are cached under
``--cache`` (default /var/tmp/otacast-bench-delta) and reused when present; the trees are
deleted after each image is built.  Full size (1200 MiB images):

* ``v1``: /usr/share without package-lists, /usr/lib/python3.11, pyenv 3.10.13 as opt/py310;
* ``small`` = v1 + 9 packages of /usr/lib/python3/dist-packages (~3.4 MB, a new directory);
* ``medium`` = small + pyenv 2.7.18 as opt/py27 (~104 MB);
* ``large`` = v1 with opt/py310 replaced by pyenv 3.12.1 as opt/py312 (an interpreter swap).

``--quick``: 96 MiB images, v1 = /usr/lib/python3.11 (~51 MB), small as above, medium = small
+ /usr/share/perl (~21 MB), large = v1 with five of its packages replaced by python 3.12's.

For each update from v1 it prints: the image's size and datagrams (ceil(L/1208)), the whole
image compressed with ``zstd -3`` (what a full download costs compressed), the block index, the
index patch v1 -> new and the lane object (`otacast.signer.delta`, k = 1: exactly v1), their sum
in bytes and in datagrams and as a share of the image's datagrams, ``xdelta3 -e -9 -B L`` of the
exact pair (size, encode time, peak RSS), zchunk (``zck`` of both images with its defaults,
``zck_delta_size``: what a zchunk client would download), and the issue's ratios: lane + patch
over the missing blocks compressed (xz -6 of exactly those blocks: the lane's own stream) and
over xdelta3.  For medium it also builds the k = 2 lane (blocks absent from v1 *or* small).
The lane is built and decoded in a child process each, for their peak RSS.  Results go to
``--results``/bench_delta.jsonl (one JSON object per update) and bench_delta.png (bytes per
update type, log scale) when matplotlib is installed (the ``bench`` extra).

    python integration/bench_delta.py --e2e small[,medium,large] [--rate 50M] [--lane-share 0.1]
        [--repeat N] [--timeout S] [--serve-timeout S] [--no-gro] [--quick]

End to end (root; ``make bench-delta-e2e``): time to image over a two-host LAN in network
namespaces the script creates and deletes (`integration.netns`, UDP GRO on the links as on a
physical NIC unless ``--no-gro``).  v1 and each update are signed with the real CLI (the update
with ``--delta-from`` v1's envelope: its lane and index patch) under ``CACHE/e2e/NAME``, the
image hard-linked there; a signature is kept while it is valid for another day and newer than
its image (and than v1's), so the sender's symbol cache (``CACHE/e2e/symbols``, named after the
session, which every signature changes) is reused between runs and encoded once; caches of
sessions no kept signature has are deleted.  Per update, one sender serves it at ``--rate``
with the lane at ``--lane-share``; then, one after the other, two devices each holding v1 in
the file installer's target with its installed record and ``installed.blockindex``
(`release.holding`, as integration/test_lane_device.py) install it: one as it would (the
lane), one with ``--no-reuse`` (every byte from the carousel: the full download, the
reference).  For each: seconds from starting ``otacast install`` to its ``finished`` line (the
verified image written; the installer's copy into the slot comes after), the datagrams its
sockets received (``datagrams`` + ``datagrams_lane`` + ``datagrams_index``) over the image's,
the summary's byte counts, and whether the installed slot is byte-identical to the update.
Also the sender's start-up: hashing, then encoding the symbol cache (or verifying a cached one:
``symbols_cached``), separately.  Each install is bounded by ``--timeout``, the sender's
start-up by ``--serve-timeout`` and its life by ``--duration``.  JSON lines go to
``--results``/bench_delta_e2e.jsonl, and a table to stdout.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.netns import Lan, stop
from integration.release import (
    KEY,
    SLOT,
    Release,
    Timed,
    holding,
    install_into_slot,
    received_datagrams,
    serve,
)
from otacast.plugin.delta import LaneDecoder, patched_index
from otacast.schemas import blockindex, units
from otacast.schemas.deltaobject import parse_lane_header
from otacast.schemas.manifest import Manifest, parse_envelope
from otacast.signer import delta

T = 1208  # symbol size: one datagram's payload
PYENV = Path("/root/.pyenv/versions")
PACKAGES = (
    "yaml",
    "six.py",
    "xmltodict.py",
    "toml",
    "jwt",
    "oauthlib",
    "httplib2",
    "pyparsing",
    "distro",
)
DIST = Path("/usr/lib/python3/dist-packages")


@dataclass(frozen=True)
class Tree:
    """What to hard-link where (destination under the tree -> source), after a base tree."""

    base: str | None
    add: tuple[tuple[str, Path], ...] = ()
    remove: tuple[str, ...] = ()


def full_trees() -> dict[str, Tree]:
    return {
        "v1": Tree(
            None,
            (
                ("usr/share", Path("/usr/share")),
                ("usr/lib/python3.11", Path("/usr/lib/python3.11")),
                ("opt/py310", PYENV / "3.10.13"),
            ),
            ("usr/share/package-lists",),
        ),
        "small": Tree(
            "v1", tuple((f"usr/lib/python3/dist-packages/{p}", DIST / p) for p in PACKAGES)
        ),
        "medium": Tree("small", (("opt/py27", PYENV / "2.7.18"),)),
        "large": Tree("v1", (("opt/py312", PYENV / "3.12.1"),), ("opt/py310",)),
    }


QUICK_SWAP = ("asyncio", "email", "idlelib", "unittest", "tkinter")


def quick_trees() -> dict[str, Tree]:
    py312 = PYENV / "3.12.1/lib/python3.12"
    return {
        "v1": Tree(None, (("usr/lib/python3.11", Path("/usr/lib/python3.11")),)),
        "small": Tree(
            "v1", tuple((f"usr/lib/python3/dist-packages/{p}", DIST / p) for p in PACKAGES)
        ),
        "medium": Tree("small", (("usr/share/perl", Path("/usr/share/perl")),)),
        "large": Tree(
            "v1",
            tuple((f"usr/lib/python3.11/{p}", py312 / p) for p in QUICK_SWAP),
            tuple(f"usr/lib/python3.11/{p}" for p in QUICK_SWAP),
        ),
    }


def run(*command: str | Path) -> None:
    subprocess.run([str(c) for c in command], check=True)


def link_copy(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["cp", "-al", str(source), str(destination)], check=False).returncode:
        run("cp", "-a", source, destination)  # another file system: a real copy


def build_images(cache: Path, trees: dict[str, Tree], size: str) -> dict[str, Path]:
    images = {name: cache / f"{name}.img" for name in trees}
    if all(path.exists() for path in images.values()):
        return images
    work = Path(tempfile.mkdtemp(prefix="trees.", dir=cache))
    try:
        for name, tree in trees.items():
            root = work / name
            if tree.base is not None:
                link_copy(work / tree.base, root)
            else:
                root.mkdir()
            for relative in tree.remove:
                shutil.rmtree(root / relative, ignore_errors=True)
            for relative, source in tree.add:
                if not source.exists():
                    sys.exit(f"bench_delta: {source} is missing here; the {name} tree needs it")
                link_copy(source, root / relative)
        for name, path in images.items():
            if path.exists():
                continue
            started = time.perf_counter()
            partial = path.with_suffix(".tmp")
            partial.unlink(missing_ok=True)
            run("mke2fs", "-q", "-t", "ext4", "-b", "4096", "-d", work / name, partial, size)
            partial.rename(path)
            print(f"built {path} in {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return images


def index_of(image: Path) -> blockindex.BlockIndex:
    """The image's block index, cached beside it."""
    cached = image.with_suffix(".blockindex")
    if cached.exists() and cached.stat().st_mtime >= image.stat().st_mtime:
        return blockindex.parse(cached.read_bytes())
    index = delta.index_of_image(image)
    cached.write_bytes(index.build())
    return index


# --- Work done in child processes (their peak RSS is theirs alone) -----------------------------


def _lane_child(new: Path, olds: list[Path], out: Path, queue: Any) -> None:
    started = time.perf_counter()
    new_index = index_of(new)
    old_indexes = [index_of(old) for old in olds]
    indexed = time.perf_counter()
    built = delta.build_delta(new, new_index, old_indexes, out, releases=len(olds))
    patch = built.patches[0].build()
    out.with_suffix(".patch").write_bytes(patch)
    queue.put(
        {
            "lane_bytes": out.stat().st_size,
            "lane_blocks": built.header.blocks,
            "lane_runs": built.header.run_count,
            "lane_raw_bytes": built.header.raw_length,
            "lane_stream_bytes": built.header.compressed_length,
            "patch_bytes": len(patch),
            "patch_ops": len(built.patches[0].ops),
            "build_s": round(time.perf_counter() - indexed, 2),
            "build_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "index_load_s": round(indexed - started, 2),
        }
    )


def _coverage_child(new: Path, previous: Path, older: Path, queue: Any) -> None:
    """Blocks a lane for `new` carries when it covers `previous` alone, or `previous` and
    `older` (k = 2): counted from the indexes, not compressed."""
    new_index = index_of(new)
    tables = [delta.lookup(index_of(previous)), delta.lookup(index_of(older))]
    counts = {}
    for k in (1, 2):
        runs = delta.missing_runs(new_index, tables[:k])
        counts[f"k{k}_from_previous_blocks"] = sum(count for _, count in runs)
    queue.put(counts)


def _decode_child(new: Path, old: Path, lane: Path, queue: Any) -> None:
    new_index = index_of(new)
    old_index = index_of(old)
    signed_length, signed_sha256 = new_index.length, new_index.sha256()
    del new_index
    started = time.perf_counter()
    index = patched_index(
        old_index,
        lane.with_suffix(".patch").read_bytes(),
        length=signed_length,
        sha256=signed_sha256,
    )
    patched = time.perf_counter()
    blocks = 0
    with lane.open("rb") as handle:
        header = parse_lane_header(handle.read(1 << 24), length=signed_length)
        handle.seek(header.stream_offset)
        decoder = LaneDecoder(header, index)
        while piece := handle.read(1 << 16):
            blocks += sum(1 for _ in decoder.feed(piece))
        decoder.finish()
    queue.put(
        {
            "patch_apply_s": round(patched - started, 2),
            "decode_s": round(time.perf_counter() - patched, 2),
            "decode_complete": decoder.complete and blocks == header.blocks,
            "decode_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        }
    )


def in_child(target: Any, *args: Any) -> dict[str, Any]:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result: dict[str, Any] = queue.get()
    process.join()
    return result


# --- The tools otacast is compared with ---------------------------------------------------------


def timed(command: list[str], stdout: Any = subprocess.DEVNULL) -> tuple[float, int]:
    """Run `command`: wall seconds and peak RSS in MB."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=stdout)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return time.perf_counter() - started, usage.ru_maxrss // 1024


def zstd_size(image: Path) -> int:
    out = image.with_suffix(".img.zst")
    if not out.exists() or out.stat().st_mtime < image.stat().st_mtime:
        run("zstd", "-q", "-3", "-T1", "-f", image, "-o", out)
    return out.stat().st_size


def zck_of(image: Path) -> Path:
    out = image.with_suffix(".img.zck")
    if not out.exists() or out.stat().st_mtime < image.stat().st_mtime:
        run("zck", "-o", out, image)
    return out


def zchunk_download(old: Path, new: Path) -> int:
    text = subprocess.run(
        ["zck_delta_size", str(zck_of(old)), str(zck_of(new))],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for line in text.splitlines():
        if line.startswith("Would download"):
            return int(line.split()[2])
    raise RuntimeError(f"zck_delta_size said: {text!r}")


def xdelta3(old: Path, new: Path, work: Path) -> dict[str, Any]:
    out = work / f"{new.stem}.xd3"
    seconds, rss = timed(
        [
            "xdelta3",
            "-e",
            "-9",
            "-f",
            "-B",
            str(new.stat().st_size),
            "-s",
            str(old),
            str(new),
            str(out),
        ]
    )
    size = out.stat().st_size
    out.unlink()
    return {"xdelta3_bytes": size, "xdelta3_s": round(seconds, 1), "xdelta3_rss_mb": rss}


# --- End to end (--e2e): time to image over a namespaced LAN ------------------------------------

E2E_V1, E2E_V2 = 1, 2  # the releases' sequences: every update is signed as v1's successor
# A signed release is reused while it is valid this much longer (its session id, and so its
# symbol cache, changes with every signature).
E2E_VALID_S = 86_400
E2E_MODES = (("lane", ()), ("full", ("--no-reuse",)))


def _manifest(release: Release) -> Manifest:
    return parse_envelope(release.manifest.read_bytes()).manifest


def _signed(
    image: Path, directory: Path, sequence: int, after: Release | None = None
) -> tuple[Release, float | None]:
    """`image` (hard-linked as ``rootfs.img`` in `directory`) signed as release `sequence`,
    with a delta lane from `after` (and its key) if given; a valid earlier signature is kept
    (then the seconds are None), else the seconds signing took."""
    directory.mkdir(parents=True, exist_ok=True)
    linked = directory / "rootfs.img"
    if linked.exists() and not linked.samefile(image):
        linked.unlink()
    if not linked.exists():
        os.link(image, linked)
    manifest = linked.with_name(linked.name + ".manifest.json")
    release = Release(directory, linked, manifest, (directory / KEY).with_suffix(".pub"))
    if release.manifest.exists():
        signed = release.manifest.stat().st_mtime
        newer = [image.stat().st_mtime] + ([after.manifest.stat().st_mtime] if after else [])
        if signed >= max(newer) and _manifest(release).expires > time.time() + E2E_VALID_S:
            return release, None
    started = time.perf_counter()
    extra = ("--delta-from", str(after.manifest)) if after else ()
    release = Release.sign(linked, sequence=sequence, extra=extra, key_from=after)
    return release, round(time.perf_counter() - started, 1)


def _drop_stale_symbols(symbols: Path, top: Path) -> None:
    """Remove the symbol caches of sessions no release signed under `top` has (each is ~1.5
    times its image)."""
    manifests = top.glob("*/rootfs.img.manifest.json")
    sessions = {parse_envelope(m.read_bytes()).manifest.session_id.hex() for m in manifests}
    for path in symbols.glob("*"):
        if not any(path.name.startswith(session) for session in sessions):
            path.unlink()


def _device_row(mode: str, done: Timed, image: Path, slot: Path, datagrams: int) -> dict[str, Any]:
    row: dict[str, Any] = {"mode": mode, "exit": done.returncode, "wall_s": round(done.seconds, 2)}
    if done.returncode != 0:
        print(f"{mode}: failed: {done.failure()}", file=sys.stderr, flush=True)
        return row
    summary = done.summary
    received = received_datagrams(summary)
    row |= {
        "to_image_s": round(done.to_finished, 2) if done.to_finished is not None else None,
        "elapsed_s": summary["elapsed"],
        "received": received,
        "received_share": round(received / datagrams, 5),
        "identical": filecmp.cmp(slot, image, shallow=False),
        "peak_rss_mb": summary.get("peak_rss_mb"),
    }
    for key in (
        "datagrams",
        "datagrams_lane",
        "datagrams_index",
        "bytes_lane",
        "bytes_local",
        "bytes_multicast",
        "bytes_http",
        "lane_from",
        "lane_index",
    ):
        row[key] = summary.get(key)
    row["notes"] = done.notes
    return row


def end_to_end(
    name: str,
    v1: Release,
    v2: Release,
    work: Path,
    symbols: Path,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Serve `v2` (with its lane) on a two-host LAN; a device holding `v1` installs it from
    the lane, then one with ``--no-reuse`` (the full download), `args.repeat` times each."""
    manifest = _manifest(v2)
    assert manifest.delta is not None
    length = v2.image.stat().st_size
    datagrams = math.ceil(length / T)
    patch = manifest.delta.sources[0].patch_length
    base: dict[str, Any] = {
        "update": name,
        "image_bytes": length,
        "image_datagrams": datagrams,
        "lane_bytes": manifest.delta.length,
        "patch_bytes": patch,
        "lane_patch_datagrams": math.ceil(manifest.delta.length / T) + math.ceil(patch / T),
        "rate": args.rate,
        "lane_share": args.lane_share,
        "gro": args.gro,
    }
    session = manifest.session_id.hex()
    base["symbols_cached"] = any(symbols.glob(f"{session}*.symbols"))
    # The sender stops by itself after the longest the runs may take.
    duration = args.serve_timeout + 2 * args.repeat * (args.timeout + 120)
    rows = []
    with Lan.create(2, gro=args.gro) as lan:
        sender, device = lan.hosts
        seen: list[dict[str, Any]] = []
        started = time.perf_counter()
        tx = serve(
            sender,
            v2,
            "--rate",
            args.rate,
            "--lane-share",
            str(args.lane_share),
            "--duration",
            f"{duration:.0f}s",
            ready=True,
            cache=symbols,
            ready_timeout=args.serve_timeout,
            seen=seen,
        )
        base["serve_ready_s"] = round(time.perf_counter() - started, 1)
        stamps = {e["event"]: _seconds(str(e["time"])) for e in seen if "time" in e}
        base["encode_s"] = round(stamps["serving"] - stamps["encoding"], 1)
        try:
            for attempt in range(args.repeat):
                for mode, options in E2E_MODES:
                    if mode not in args.modes.split(","):
                        continue
                    with tempfile.TemporaryDirectory(prefix=f"{name}-{mode}.", dir=work) as held:
                        directory = Path(held)
                        state = holding(v1, directory)
                        done = install_into_slot(
                            device, v2, directory, state, *options, timeout=args.timeout
                        )
                        row = base | {"run": attempt + 1}
                        row |= _device_row(mode, done, v2.image, directory / SLOT, datagrams)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            stop([tx])
    return rows


def _seconds(stamp: str) -> float:
    """An RFC 3339 time of a status line, in seconds since the epoch."""
    return datetime.fromisoformat(stamp).timestamp()


def e2e_table(rows: list[dict[str, Any]]) -> str:
    """One line per update and run: the lane device against the full download."""
    lines = [
        markdown_head(
            "update",
            "lane + patch MB (datagrams)",
            "lane device: datagrams received (÷ image)",
            "full device: datagrams received (÷ image)",
            "time to image, lane s",
            "full s",
            "lane ÷ full",
            "peak RSS MB, lane / full",
            "sender ready s (encode s)",
        )
    ]
    pairs: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for row in rows:
        pairs.setdefault((row["update"], row["run"]), {})[row["mode"]] = row
    for (update, _), by_mode in pairs.items():
        lane, full = by_mode.get("lane", {}), by_mode.get("full", {})
        first = lane or full

        def received(r: dict[str, Any]) -> str:
            if not r:
                return "not run"
            if "received" not in r:
                return f"failed (exit {r.get('exit')})"
            return f"{r['received']:,} ({r['received_share']:.2%})" + (
                "" if r["identical"] else " NOT IDENTICAL"
            )

        def seconds(r: dict[str, Any]) -> str:
            return f"{r['to_image_s']:.1f}" if r.get("to_image_s") else "-"

        ratio = (
            f"{lane['to_image_s'] / full['to_image_s']:.3f}"
            if lane.get("to_image_s") and full.get("to_image_s")
            else "-"
        )
        lines.append(
            f"| {update} | {(first['lane_bytes'] + first['patch_bytes']) / 1e6:.2f}"
            f" ({first['lane_patch_datagrams']:,}) | {received(lane)} | {received(full)}"
            f" | {seconds(lane)} | {seconds(full)} | {ratio}"
            f" | {lane.get('peak_rss_mb') or '-'} / {full.get('peak_rss_mb') or '-'}"
            f" | {first['serve_ready_s']:.0f} ({first['encode_s']:.0f}"
            f"{', cached' if first['symbols_cached'] else ''}) |"
        )
    return "\n".join(lines)


def _signing(seconds: float | None) -> str:
    return "signature kept" if seconds is None else f"signed in {seconds:.1f} s"


def run_end_to_end(args: argparse.Namespace, images: dict[str, Path], cache: Path) -> int:
    if os.geteuid() != 0:
        sys.exit("bench_delta --e2e: network namespaces need root")
    names = args.e2e.split(",")
    unknown = [n for n in names if n not in images or n == "v1"]
    if unknown:
        sys.exit(f"bench_delta --e2e: unknown update(s) {', '.join(unknown)}")
    top = cache / "e2e"
    symbols = top / "symbols"
    symbols.mkdir(parents=True, exist_ok=True)
    v1, signed = _signed(images["v1"], top / "v1", E2E_V1)
    print(f"v1: {_signing(signed)}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-delta-e2e.", dir=cache) as work:
        for name in names:
            v2, signed = _signed(images[name], top / name, E2E_V2, after=v1)
            print(f"{name}: {_signing(signed)}", flush=True)
            _drop_stale_symbols(symbols, top)
            for row in end_to_end(name, v1, v2, Path(work), symbols, args):
                rows.append(row | {"sign_s": signed})
    with (args.results / "bench_delta_e2e.jsonl").open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    print(e2e_table(rows))
    return 0 if all(r.get("identical") for r in rows) else 1


# --- The run ----------------------------------------------------------------------------------


def measure(name: str, images: dict[str, Path], work: Path, tools: bool) -> dict[str, Any]:
    old, new = images["v1"], images[name]
    length = new.stat().st_size
    row: dict[str, Any] = {
        "update": name,
        "image_bytes": length,
        "image_datagrams": math.ceil(length / T),
        "index_bytes": blockindex.index_length(length),
    }
    lane = work / f"{name}.delta"
    row |= in_child(_lane_child, new, [old], lane)
    row |= in_child(_decode_child, new, old, lane)
    row["lane_patch_bytes"] = row["lane_bytes"] + row["patch_bytes"]
    row["lane_patch_datagrams"] = math.ceil(row["lane_bytes"] / T) + math.ceil(
        row["patch_bytes"] / T
    )
    row["lane_patch_share"] = row["lane_patch_datagrams"] / row["image_datagrams"]
    row["ratio_to_missing_xz"] = row["lane_patch_bytes"] / row["lane_stream_bytes"]
    if name == "medium":
        row |= in_child(_coverage_child, new, images["small"], old)
    if tools:
        row["zstd3_bytes"] = zstd_size(new)
        row |= xdelta3(old, new, work)
        row["ratio_to_xdelta3"] = row["lane_patch_bytes"] / row["xdelta3_bytes"]
        row["zchunk_bytes"] = zchunk_download(old, new)
    return row


def mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def markdown_head(*columns: str) -> str:
    """A Markdown table's head row and separator."""
    return f"| {' | '.join(columns)} |\n|" + "---|" * len(columns)


def table(rows: list[dict[str, Any]]) -> str:
    head = markdown_head(
        "update",
        "image MB (datagrams)",
        "zstd -3 MB",
        "index MB",
        "patch KB (ops)",
        "missing blocks (runs)",
        "lane MB",
        "lane + patch MB",
        "datagrams (% of image)",
        "xdelta3 -9 MB (s, RSS MB)",
        "zchunk MB",
        "÷ missing xz",
        "÷ xdelta3",
    )
    lines = [head]
    for r in rows:
        tools = "zstd3_bytes" in r
        lines.append(
            f"| {r['update']} | {mb(r['image_bytes'])} ({r['image_datagrams']}) "
            f"| {mb(r['zstd3_bytes']) if tools else '-'} | {mb(r['index_bytes'])} "
            f"| {r['patch_bytes'] / 1e3:.0f} ({r['patch_ops']}) "
            f"| {r['lane_blocks']} = {mb(r['lane_raw_bytes'])} MB ({r['lane_runs']}) "
            f"| {mb(r['lane_bytes'])} | {mb(r['lane_patch_bytes'])} "
            f"| {r['lane_patch_datagrams']} ({r['lane_patch_share']:.2%}) "
            + (
                f"| {mb(r['xdelta3_bytes'])} ({r['xdelta3_s']:.0f}, {r['xdelta3_rss_mb']}) "
                f"| {mb(r['zchunk_bytes'])} | {r['ratio_to_missing_xz']:.2f} "
                f"| {r['ratio_to_xdelta3']:.2f} |"
                if tools
                else f"| - | - | {r['ratio_to_missing_xz']:.2f} | - |"
            )
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kinds = [
        ("full image, zstd -3", "zstd3_bytes"),
        ("zchunk (zck defaults)", "zchunk_bytes"),
        ("xdelta3 -9 (exact pair)", "xdelta3_bytes"),
        ("otacast lane + index patch", "lane_patch_bytes"),
    ]
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=100)
    width = 0.2
    for k, (label, key) in enumerate(kinds):
        xs = [i + (k - 1.5) * width for i in range(len(rows))]
        values = [r.get(key, 0) / 1e6 for r in rows]
        axes.bar(xs, values, width, label=label)
        for x, v in zip(xs, values, strict=True):
            axes.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=6)
    axes.set_xticks(range(len(rows)), [f"{r['update']} update" for r in rows])
    axes.set_yscale("log")
    axes.set_ylabel("MB to the device (log)")
    axes.set_title(f"Bytes per update of a {rows[0]['image_bytes'] / 2**20:.0f} MiB ext4 image")
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="96 MiB images from a ~50 MB tree")
    parser.add_argument("--cache", type=Path, default=Path("/var/tmp/otacast-bench-delta"))
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--no-tools", action="store_true", help="skip zstd, xdelta3 and zchunk")
    parser.add_argument(
        "--replot", action="store_true", help="only redraw the plot from the results' JSON lines"
    )
    e2e = parser.add_argument_group("end to end (--e2e; root: a namespaced LAN; module doc)")
    e2e.add_argument(
        "--e2e",
        metavar="UPDATES",
        help="instead of sizes, time to image: comma-separated updates (small,medium,large)",
    )
    e2e.add_argument("--rate", default="50M", help="serve's rate (default 50M bytes/s)")
    e2e.add_argument(
        "--lane-share", type=float, default=0.1, help="serve's --lane-share (default 0.1)"
    )
    e2e.add_argument("--repeat", type=int, default=1, help="lane and full runs per update")
    e2e.add_argument(
        "--modes",
        default="lane,full",
        help="which devices run: lane, full or both (default lane,full)",
    )
    e2e.add_argument(
        "--timeout", type=float, default=600, help="seconds one install may take (default 600)"
    )
    e2e.add_argument(
        "--serve-timeout",
        type=float,
        default=900,
        help="seconds the sender may take to hash and encode before sending (default 900)",
    )
    e2e.add_argument(
        "--gro",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="UDP GRO on the device's link, as on a physical NIC (default on)",
    )
    args = parser.parse_args(argv)
    if args.e2e:
        units.parse_rate(args.rate)  # a bad rate fails here, not after the encode
        if not 1 <= args.repeat <= 5 or not 0 < args.lane_share < 1:
            parser.error("--repeat is 1..5 and --lane-share a fraction in (0, 1)")
        if not args.modes or not set(args.modes.split(",")) <= {m for m, _ in E2E_MODES}:
            parser.error("--modes is lane, full or lane,full")
    if args.replot:
        lines = (args.results / "bench_delta.jsonl").read_text(encoding="utf-8").splitlines()
        return (
            0 if plot([json.loads(line) for line in lines], args.results / "bench_delta.png") else 1
        )
    cache = args.cache / ("quick" if args.quick else "full")
    cache.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    tools = not args.no_tools
    missing = [
        t for t in ("mke2fs", "zstd", "xdelta3", "zck", "zck_delta_size") if not shutil.which(t)
    ]
    if missing and tools and not args.e2e:
        sys.exit(f"bench_delta: {', '.join(missing)} not installed (make setup installs them)")
    started = time.perf_counter()
    images = build_images(
        cache, quick_trees() if args.quick else full_trees(), "96M" if args.quick else "1200M"
    )
    if args.e2e:
        status = run_end_to_end(args, images, cache)
        print(f"total {time.perf_counter() - started:.0f} s")
        return status
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-delta.", dir=cache) as work:
        for name in ("small", "medium", "large"):
            row = measure(name, images, Path(work), tools)
            rows.append(row)
            print(json.dumps(row), flush=True)
    with (args.results / "bench_delta.jsonl").open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    print(table(rows))
    medium = next(r for r in rows if r["update"] == "medium")
    print(
        f"medium's lane, blocks carried: for devices on small only (k = 1)"
        f" {medium['k1_from_previous_blocks']}, on small or v1 (k = 2)"
        f" {medium['k2_from_previous_blocks']}, on v1 only {medium['lane_blocks']}"
    )
    if tools:
        png = args.results / "bench_delta.png"
        print(f"plot: {png}" if plot(rows, png) else "plot: matplotlib is not installed, skipped")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
