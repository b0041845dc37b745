"""`otacast fetch` end to end on namespaced LANs: loss, several senders, SSM filtering, resume
after kill -9, and manifests that must be refused with nothing written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from otacast.plugin.errors import NoManifestError, UpToDate
from otacast.schemas.errors import Expired, Rollback, UnknownKey, WrongDevice
from otacast.schemas.manifest import parse_envelope

from . import services
from .netns import Host, LanFactory, stop
from .release import (
    CHANNEL,
    DEVICE,
    Release,
    dropped,
    fetch,
    fetch_command,
    install,
    keygen,
    publish,
    random_loss,
    serve,
    start_fetch,
    summary_of,
)

MB = 1_000_000

pytestmark = pytest.mark.usefixtures("nft_or_skip")


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    # 1 MiB chunks (20 of them): the kill, resume and repair tests need chunks completing
    # through the run (the default 8 MiB would make three).
    return Release.make(tmp_path_factory.mktemp("release"), 20 * MB, chunk="1M")


def _fetch_through_loss(
    lan: LanFactory, release: Release, tmp_path: Path, loss: int, *args: str
) -> tuple[int, list[dict[str, object]], str]:
    """`fetch` (with `args`) from one sender at 40 MB/s, one datagram per send, through
    `loss` percent of random loss, into tmp_path/out.img."""
    sender, receiver = lan(2).hosts
    random_loss(receiver, loss)
    tx = serve(sender, release, "--rate", "40M", "--no-gso", "--duration", "120s")
    try:
        return fetch(
            receiver,
            release,
            tmp_path / "state",
            tmp_path / "out.img",
            "--source",
            sender.address,
            *args,
        )
    finally:
        stop([tx])


def test_fetch_index_receives_the_block_index_over_multicast_beside_the_image(
    lan: LanFactory, release: Release, tmp_path: Path
) -> None:
    index = parse_envelope(release.manifest.read_bytes()).manifest.index
    assert index is not None  # sign lists one for a raw image by default
    code, events, err = _fetch_through_loss(lan, release, tmp_path, 10, "--index")
    assert code == 0, err
    summary = summary_of(events)
    # Checked against the signed length and SHA-256 by the core before it is counted.
    assert summary["index_bytes"] == index.length
    rejected = summary["rejected"]
    assert isinstance(rejected, dict)
    assert not rejected.keys() & {"index-mismatch", "index-block"}
    assert (tmp_path / "out.img").read_bytes() == release.image.read_bytes()


@pytest.mark.parametrize("loss", [0, 10, 30])
def test_a_20_mb_image_arrives_identical_through_random_loss(
    lan: LanFactory, release: Release, tmp_path: Path, loss: int
) -> None:
    net = lan(4)
    sender, receiver = net.hosts[0], net.hosts[3]
    if loss:
        random_loss(receiver, loss)
    # One send per datagram, so the loss applies to datagrams, not to GSO runs of 53.
    tx = serve(sender, release, "--rate", "40M", "--no-gso", "--duration", "120s")
    try:
        code, events, err = fetch(
            receiver, release, tmp_path / "state", tmp_path / "out.img", "--source", sender.address
        )
    finally:
        stop([tx])
    assert code == 0, err
    summary = summary_of(events)
    assert summary["bytes_http"] == 0
    # Only counted discards of honest data: early data beyond what is held before the (lossy)
    # manifest arrives, symbols of a chunk that holds K already while its decode waits its turn
    # (``decode-pending``), and (with in-memory decoders only) symbols of chunks waiting for
    # decoder room.  Nothing malformed.
    assert set(summary["rejected"]) <= {"no-manifest-yet", "decode-pending", "decoder-budget"}  # type: ignore[call-overload]
    assert (tmp_path / "out.img").read_bytes() == release.image.read_bytes()
    # A first run resumes nothing: the datagrams held until the manifest are this run's own.
    notes = [str(e["message"]) for e in events if e.get("event") == "note"]
    assert not [n for n in notes if n.startswith("resumed")], notes
    if loss:
        assert dropped(receiver) > 0
    # The session's state is cleaned up; only the status record (for `otacast status`) stays.
    assert {p.name for p in (tmp_path / "state").iterdir()} <= {"status.json"}


def test_two_senders_at_once_send_disjoint_symbols_that_all_count(
    lan: LanFactory, release: Release, tmp_path: Path
) -> None:
    """Two senders of one release (`--sender 0/2`, `1/2`) send different symbols, so a receiver
    hearing both uses nearly every datagram it takes in: what makes it finish about twice as
    fast.  Asserted on counts (times on a shared machine are not); the times are printed."""
    net = lan(4)
    # Paced well below what the machine can do, so time is set by the senders' rates.  The
    # receiver joins first and the senders (symbols already encoded) start together, so the
    # comparison measures delivery, not where in the pass each run happened to join.
    a, b, receiver = net.hosts[0], net.hosts[1], net.hosts[3]
    stop([serve(host, release, "--rate", "8M", ready=True) for host in (a, b)])  # warm caches
    times, summaries = {}, {}
    for name, senders in (("one", [a]), ("two", [a, b])):
        sources = [arg for host in senders for arg in ("--source", host.address)]
        out = tmp_path / name / "out.img"
        out.parent.mkdir()
        rx = start_fetch(receiver, release, tmp_path / name / "state", out, *sources)
        time.sleep(1.0)  # joined and waiting for a manifest
        started = time.monotonic()
        txs = [
            serve(
                host,
                release,
                "--rate",
                "8M",
                "--sender",
                f"{i}/{len(senders)}",
                "--duration",
                "120s",
            )
            for i, host in enumerate(senders)
        ]
        try:
            output, err = rx.communicate(timeout=120)
            times[name] = time.monotonic() - started
        finally:
            stop([rx, *txs])
        assert rx.returncode == 0, err
        assert out.read_bytes() == release.image.read_bytes()
        summaries[name] = summary_of([json.loads(line) for line in output.splitlines()])
    ratio = times["two"] / times["one"]
    print(
        f"two senders / one sender completion time: {ratio:.2f} "
        f"({times['two']:.2f} s / {times['one']:.2f} s)"
    )
    two = summaries["two"]
    assert two["sources"] == 2
    # Every datagram but the manifest's and the rest of a finished chunk's visit is a symbol
    # the decoder used: two senders repeating each other would waste about half.
    taken = int(two["datagrams"]) - int(two["late"])  # type: ignore[call-overload]
    print(f"two senders: {two['symbols_used']} symbols used of {taken} datagrams taken")
    assert int(two["symbols_used"]) >= 0.95 * taken, two  # type: ignore[call-overload]
    assert int(two["datagrams"]) <= 1.1 * int(summaries["one"]["datagrams"]), summaries  # type: ignore[call-overload]


def test_ssm_join_ignores_an_unlisted_source_sending_garbage_to_the_group(
    lan: LanFactory, release: Release, tmp_path: Path
) -> None:
    net = lan(4)
    honest, attacker, receiver = net.hosts[0], net.hosts[2], net.hosts[3]
    manifest = json.loads(release.manifest.read_text())["signed"]
    group, port = manifest["transport"]["ssm_group"], manifest["transport"]["port"]
    flood = attacker.popen(
        str(Path(DEVICE).parent / "python"),
        "-c",
        "import os, socket, sys, time\n"
        "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
        "i = socket.if_nametoindex('eth0')\n"
        "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, i)\n"
        "end = time.time() + 60\n"
        "while time.time() < end:\n"
        "    s.sendto(b'OC\\x01\\x01' + os.urandom(1224), (sys.argv[1], int(sys.argv[2]), 0, i))\n"
        "    time.sleep(0.0002)\n",
        group,
        str(port),
    )
    tx = serve(honest, release, "--rate", "40M", "--duration", "120s")
    try:
        code, events, err = fetch(
            receiver, release, tmp_path / "state", tmp_path / "out.img", "--source", honest.address
        )
    finally:
        stop([tx, flood])
    assert code == 0, err
    # The flood carries random session ids: had any of it arrived it would be counted as
    # another session's or as malformed.  Only honest early data may have been discarded.
    rejected = summary_of(events)["rejected"]
    assert set(rejected) <= {"no-manifest-yet", "decode-pending"}, rejected  # type: ignore[arg-type]
    assert (tmp_path / "out.img").read_bytes() == release.image.read_bytes()


def kill_9_when(command: list[str], key: str, at_least: int) -> None:
    """Start a `fetch` command and kill it with SIGKILL once a progress line has `key` >= N."""
    first = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert first.stdout is not None
    for line in first.stdout:
        event = json.loads(line)
        if event.get("event") == "progress" and int(event[key]) >= at_least:
            break
    os.kill(first.pid, signal.SIGKILL)
    first.wait()


def test_kill_9_mid_download_then_the_same_command_resumes(
    lan: LanFactory, release: Release, tmp_path: Path
) -> None:
    net = lan(4)
    sender, receiver = net.hosts[0], net.hosts[3]
    state, out = tmp_path / "state", tmp_path / "out.img"
    tx = serve(sender, release, "--rate", "4M", "--duration", "120s")
    try:
        command = fetch_command(receiver, release, state, out, "--source", sender.address)
        # Every chunk advances every round, so mid-download means symbols of every chunk, no
        # chunk whole.  The store syncs in the background every second: killed after ~3 s
        # (10,000 of the ~17,400 datagrams needed), thousands of symbols must have been kept.
        kill_9_when(command, "datagrams", 10_000)
        assert not out.exists()
        code, events, err = fetch(receiver, release, state, out, "--source", sender.address)
    finally:
        stop([tx])
    assert code == 0, err
    notes = [str(e["message"]) for e in events if e.get("event") == "note"]
    resumed = [n for n in notes if n.startswith("resumed") and "stored symbols" in n]
    assert len(resumed) == 1, notes
    held = int(resumed[0].split()[1])
    assert held >= 3000, resumed
    summary = summary_of(events)
    m = parse_envelope(release.manifest.read_bytes()).manifest
    k = sum(m.source_symbols(i) for i in range(m.chunk_count))
    # The stored symbols count: the second run uses about that many fewer (measured 7103 used
    # after 10,368 resumed, of K = 16,575: each chunk also takes the rest of its last visit).
    used = int(summary["symbols_used"])  # type: ignore[call-overload]
    assert used <= k - 0.8 * held, (summary, held, k)
    assert out.read_bytes() == release.image.read_bytes()


def test_with_the_symbol_store_a_30_percent_loss_download_refuses_no_symbol(
    lan: LanFactory, release: Release, tmp_path: Path
) -> None:
    code, events, err = _fetch_through_loss(lan, release, tmp_path, 30, "--symbols", "store")
    assert code == 0, err
    summary = summary_of(events)
    # Every symbol was kept on disk: nothing refused for want of a decoder (only, while a
    # chunk that holds K symbols waits for its decode, its surplus: ``decode-pending``).
    assert set(summary["rejected"]) <= {"no-manifest-yet", "decode-pending"}  # type: ignore[call-overload]
    assert (tmp_path / "out.img").read_bytes() == release.image.read_bytes()
    assert {p.name for p in (tmp_path / "state").iterdir()} <= {"status.json"}


def test_a_receiver_left_with_only_decodes_to_run_leaves_the_groups_and_still_finishes(
    lan: LanFactory, release: Release, tmp_path: Path
) -> None:
    """While the decode worker decodes the last chunks, nothing the carousel sends can help:
    the receiver drops its memberships (`MulticastReceiver.leave`, tested against the kernel
    in test_receive_socket.py) and, its decodes done, has the image all the same."""
    code, events, err = _fetch_through_loss(
        lan, release, tmp_path, 30, "--symbols", "store", "--decode", "worker"
    )
    assert code == 0, err
    summary = summary_of(events)
    assert summary["decodes_in_worker"] > 0  # type: ignore[operator]
    assert summary["left_for_decodes"] >= 1  # type: ignore[operator]
    assert (tmp_path / "out.img").read_bytes() == release.image.read_bytes()


@pytest.mark.parametrize("decode", ["inline", "worker"])
def test_kill_9_with_the_symbol_store_resumes_with_the_stored_symbols(
    lan: LanFactory, release: Release, tmp_path: Path, decode: str
) -> None:
    net = lan(2)
    sender, receiver = net.hosts
    state, out = tmp_path / "state", tmp_path / "out.img"
    store = ("--source", sender.address, "--symbols", "store", "--decode", decode)
    random_loss(receiver, 20)  # chunks stay in progress across the pass: symbols to keep
    tx = serve(sender, release, "--rate", "4M", "--no-gso", "--duration", "120s")
    try:
        # Past two of the store's batched flushes (4096 symbols each), within the first pass.
        kill_9_when(fetch_command(receiver, release, state, out, *store), "datagrams", 12000)
        assert not out.exists()
        code, events, err = fetch(receiver, release, state, out, *store)
    finally:
        stop([tx])
    assert code == 0, err
    notes = [str(e["message"]) for e in events if e.get("event") == "note"]
    resumed = [n for n in notes if n.startswith("resumed ") and "stored symbols" in n]
    assert resumed and int(resumed[0].split()[1]) > 0, notes
    assert out.read_bytes() == release.image.read_bytes()


@pytest.mark.parametrize(
    ("trust", "fetch_args", "error"),
    [
        ("other", (), UnknownKey),
        ("release", ("--installed-sequence", "4"), Rollback),
        ("release", ("--device-type", "toaster"), WrongDevice),
    ],
)
def test_refused_manifests_write_nothing(
    lan: LanFactory,
    release: Release,
    tmp_path: Path,
    trust: str,
    fetch_args: tuple[str, ...],
    error: type[Exception],
) -> None:
    net = lan(4)
    sender, receiver = net.hosts[0], net.hosts[3]
    public = release.public
    if trust == "other":
        _, public = keygen(tmp_path / "other")
    tx = serve(sender, release, "--rate", "20M", "--duration", "120s")
    state, out = tmp_path / "state", tmp_path / "out.img"
    try:
        # From the channel: heard, refused, and after the join timeout a clear failure.
        base = fetch_command(
            receiver, release, state, out, "--source", sender.address, "--join-timeout", "2"
        )
        base[base.index(str(release.public))] = str(public)
        base[base.index("--device-type") + 1 : base.index("--device-type") + 2] = ["testboard"]
        command = [*base, *fetch_args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        # Given on the command line: refused at once with the specific code.
        given = subprocess.run(
            [*command, "--manifest", str(release.manifest)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        stop([tx])
    # Heard on the channel, the refusal keeps its own code too (not 45, "nothing heard").
    assert done.returncode == error.exit_code, done.stderr  # type: ignore[attr-defined]
    assert "the channel's was refused" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    notes = [json.loads(line)["message"] for line in done.stdout.splitlines()[:-1]]
    assert any("refused a manifest" in note for note in notes)
    assert given.returncode == error.exit_code, given.stderr  # type: ignore[attr-defined]
    assert len(given.stderr.strip().splitlines()) == 1
    assert not out.exists()
    # Nothing of the refused release is kept; the status record only notes the error.
    assert not state.exists() or {p.name for p in state.iterdir()} <= {"status.json"}


def test_expired_manifest_is_refused(lan: LanFactory, tmp_path: Path) -> None:
    net = lan(4)
    release = Release.make(tmp_path / "r", 300_000, chunk="64K", extra=("--expires", "1s"))
    time.sleep(1.5)
    receiver = net.hosts[3]
    command = fetch_command(
        receiver,
        release,
        tmp_path / "state",
        tmp_path / "out.img",
        "--manifest",
        str(release.manifest),
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == Expired.exit_code
    assert not (tmp_path / "out.img").exists()


@pytest.fixture
def mirrored(tmp_path_factory: pytest.TempPathFactory) -> Release:
    """A release whose manifest names an HTTP mirror on the first host (fd51::1)."""
    return Release.make(
        tmp_path_factory.mktemp("mirrored"),
        20 * MB,
        # 40 chunks: at 2 MB/s a round (every chunk's next visit) lasts ~2.75 s, so the chunks
        # complete ~0.07 s apart at the end of a pass; multicast stops once 3 are done and
        # HTTP fetches the rest.
        chunk="512K",
        http_url="http://[fd51::1]:8080/rel/rootfs.img",
    )


def test_multicast_stopped_half_way_is_repaired_over_http_fetching_only_missing_chunks(
    lan: LanFactory, mirrored: Release, tmp_path: Path
) -> None:
    net = lan(4)
    sender, receiver = net.hosts[0], net.hosts[3]
    www = tmp_path / "www"
    publish(mirrored, www)
    try:
        with services.nginx(sender, www, tmp_path / "nginx") as mirror:
            tx = serve(sender, mirrored, "--rate", "2M", "--duration", "120s")
            try:
                rx, events, err = _fetch_while_multicast_stops(
                    receiver, sender.address, mirrored, tmp_path, tx
                )
            finally:
                stop([tx])
            served = mirror.served()
    except services.ServiceMissing as exc:
        pytest.skip(str(exc))
    assert rx.returncode == 0, err
    summary = summary_of(events)
    assert served and all(s.status == 206 for s in served)
    assert sum(s.bytes for s in served) == summary["bytes_http"]
    assert int(summary["bytes_http"]) + int(summary["bytes_multicast"]) == 20 * MB  # type: ignore[call-overload]
    assert int(summary["bytes_multicast"]) >= 3 * 512 * 1024  # type: ignore[call-overload]
    assert (tmp_path / "out.img").read_bytes() == mirrored.image.read_bytes()


def _fetch_while_multicast_stops(
    receiver: Host, source: str, release: Release, tmp_path: Path, tx: subprocess.Popen[str]
) -> tuple[subprocess.Popen[str], list[dict[str, object]], str]:
    """Run fetch; stop the sender once three chunks are in; return the events."""
    rx = start_fetch(
        receiver,
        release,
        tmp_path / "state",
        tmp_path / "out.img",
        "--source",
        source,
        "--stall-timeout",
        "2",
    )
    assert rx.stdout is not None
    events: list[dict[str, object]] = []
    for line in rx.stdout:
        events.append(json.loads(line))
        if events[-1].get("event") == "progress" and int(events[-1]["chunks_done"]) >= 3:  # type: ignore[call-overload]
            stop([tx])  # multicast stops half way
            break
    out, err = rx.communicate(timeout=120)
    return rx, events + [json.loads(line) for line in out.splitlines()], err


def test_sources_found_by_dns_srv_are_joined_source_specifically(
    lan: LanFactory, release: Release, tmp_path: Path
) -> None:
    net = lan(4)
    a, b, standby, receiver = net.hosts
    records = [
        f"--srv-host=_otacast._udp.{CHANNEL},tx1.example.test,4242,10,5",
        f"--srv-host=_otacast._udp.{CHANNEL},tx2.example.test,4242,10,5",
        f"--srv-host=_otacast._udp.{CHANNEL},standby.example.test,4242,20,5",
        f"--host-record=tx1.example.test,{a.address}",
        f"--host-record=tx2.example.test,{b.address}",
        f"--host-record=standby.example.test,{standby.address}",
        "--local=/example.test/",
    ]
    txs = [
        serve(host, release, "--rate", "20M", "--sender", f"{i}/2", "--duration", "120s")
        for i, host in enumerate((a, b))
    ]
    try:
        with services.dnsmasq(receiver, records, tmp_path / "dnsmasq.log") as resolver:
            code, events, err = fetch(
                receiver, release, tmp_path / "state", tmp_path / "out.img", "--resolver", resolver
            )
    except services.ServiceMissing as exc:
        pytest.skip(str(exc))
    finally:
        stop(txs)
    assert code == 0, err
    summary = summary_of(events)
    group = json.loads(release.manifest.read_text())["signed"]["transport"]["ssm_group"]
    assert sorted(summary["joins"]) == sorted(  # type: ignore[arg-type]
        [f"({a.address}, {group})", f"({b.address}, {group})"]
    )
    assert (tmp_path / "out.img").read_bytes() == release.image.read_bytes()


def test_install_hands_the_image_over_and_then_says_up_to_date_apart_from_nothing_heard(
    lan: LanFactory, release: Release, tmp_path: Path
) -> None:
    net = lan(4)
    sender, receiver = net.hosts[0], net.hosts[3]
    target = tmp_path / "slot.img"
    target.write_bytes(b"factory image")
    state = tmp_path / "state"
    tx = serve(sender, release, "--rate", "40M", "--duration", "120s")
    try:
        args = ("--source", sender.address, "--join-timeout", "3")
        first = install(receiver, release, state, tmp_path / "out.img", f"file:{target}", *args)
        # The same release again, from the channel: the device runs it already.
        current = install(receiver, release, state, tmp_path / "out.img", f"file:{target}", *args)
        # And given with --manifest.
        again = install(
            receiver,
            release,
            state,
            tmp_path / "out.img",
            f"file:{target}",
            *args,
            "--manifest",
            str(release.manifest),
        )
    finally:
        stop([tx])
    assert first.returncode == 0, first.stderr
    installed = json.loads(first.stdout.splitlines()[-1])
    assert installed["event"] == "installed" and installed["sequence"] == 3
    assert target.read_bytes() == release.image.read_bytes()
    assert (tmp_path / "slot.img.previous").read_bytes() == b"factory image"
    assert current.returncode == again.returncode == UpToDate.exit_code, current.stderr
    said = json.loads(current.stdout.splitlines()[-1])
    assert said.pop("time").endswith("Z")  # every JSON line has its time (RFC 3339, UTC)
    assert said == {
        "event": "up-to-date",
        "sequence": 3,
        "message": "up to date: the channel's release, sequence 3, is installed",
    }
    assert json.loads(again.stdout.splitlines()[-1])["event"] == "up-to-date"
    assert current.stderr == ""
    assert target.read_bytes() == release.image.read_bytes()
    # With the sender gone, the same command is a network failure, not "up to date".
    gone = install(receiver, release, state, tmp_path / "out.img", f"file:{target}", *args)
    assert gone.returncode == NoManifestError.exit_code != UpToDate.exit_code, gone.stderr


@pytest.mark.parametrize("keep", [False, True], ids=["default", "keep-staged"])
def test_install_leaves_no_second_image_in_the_state_directory_unless_kept(
    lan: LanFactory, release: Release, tmp_path: Path, keep: bool
) -> None:
    sender, receiver = lan(2).hosts
    target, state = tmp_path / "slot.img", tmp_path / "state"
    state.mkdir()
    tx = serve(sender, release, "--rate", "40M", "--duration", "120s")
    try:
        done = install(
            receiver,
            release,
            state,
            state / "received.img",  # the default place, named so the test can look for it
            f"file:{target}",
            "--source",
            sender.address,
            *(("--keep-staged",) if keep else ()),
        )
    finally:
        stop([tx])
    assert done.returncode == 0, done.stderr
    assert target.read_bytes() == release.image.read_bytes()
    size = release.image.stat().st_size
    large = [p for p in state.rglob("*") if p.is_file() and p.stat().st_size >= size]
    assert large == ([state / "received.img"] if keep else []), large
