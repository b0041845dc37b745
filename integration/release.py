"""Shared helpers for end-to-end tests, benchmarks and the demo: a signed release made with the
real CLI, senders and receivers started in namespace hosts, random packet loss with nftables.

Every command line the tests run against ``otacast-signer`` and ``otacast`` is built here, once:
`keygen`, `Release.make` / `Release.sign` (``sign``), `publish`, `serve_command` (``serve``),
`fetch_command` and `install_command`.  A test adds only the options its case is about, so
a change to a command's required options is one edit, not one per test file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from otacast.plugin.installed import INDEX, stage_index, write_installed
from otacast.plugin.trust import load_trust
from otacast.plugin.verify import check_signature
from otacast.schemas.policy import VerifiedManifest, verify_envelope

from .netns import BIN, Host

SIGNER = str(BIN / "otacast-signer")
DEVICE = str(BIN / "otacast")
CHANNEL = "updates.example.test"
DEVICE_TYPE = "testboard"
KEY = "release"  # the release key's file stem in a release's directory
WRITE_BLOCK = 16 << 20  # random images are written in blocks: a 1 GiB one is never in memory


def compile_bytecode() -> None:
    """Compile the installed package's bytecode, as a wheel or distribution package installs
    it: a benchmark then times the start-up a user's device has.  (With
    ``PYTHONDONTWRITEBYTECODE`` set, as in some shells and CI images, every start of
    ``otacast`` would otherwise compile its ~90 modules again: 0.1 s of CPU measured per start,
    0.2 ms per MB at 500 MB.)"""
    import compileall

    import otacast

    for directory in otacast.__path__:
        compileall.compile_dir(directory, quiet=1)


def keygen(stem: Path) -> tuple[Path, Path]:
    """`otacast-signer keygen`: a new key pair, as (secret ``stem.key``, public ``stem.pub``)."""
    subprocess.run([SIGNER, "keygen", str(stem)], check=True, capture_output=True)
    return stem.with_suffix(".key"), stem.with_suffix(".pub")


def random_file(path: Path, size: int) -> None:
    with path.open("wb") as out:
        left = size
        while left:
            block = min(left, WRITE_BLOCK)
            out.write(os.urandom(block))
            left -= block


@dataclass
class Release:
    directory: Path
    image: Path
    manifest: Path
    public: Path

    @classmethod
    def make(
        cls,
        directory: Path,
        size: int,
        *,
        sequence: int = 3,
        chunk: str = "",
        http_url: str | None = None,
        extra: tuple[str, ...] = (),
        key_from: Release | None = None,
    ) -> Release:
        """A release of `size` random bytes, ``rootfs.img`` in `directory`; signed with the
        release key of `key_from` if given (a newer release of the same publisher)."""
        directory.mkdir(parents=True, exist_ok=True)
        image = directory / "rootfs.img"
        random_file(image, size)
        return cls.sign(
            image,
            sequence=sequence,
            chunk=chunk,
            http_url=http_url,
            extra=extra,
            key_from=key_from,
        )

    @classmethod
    def sign(
        cls,
        image: Path,
        *,
        sequence: int = 3,
        chunk: str = "",
        http_url: str | None = None,
        extra: tuple[str, ...] = (),
        key_from: Release | None = None,
    ) -> Release:
        """`image` signed for the test channel and device type, with the release key of its
        directory (made there first if there is none, so releases can share one), or of
        `key_from` (copied there first: a newer release of the same publisher)."""
        directory = image.parent
        key = directory / KEY
        if key_from is not None and key_from.directory != directory:
            for suffix in (".key", ".pub"):
                shutil.copy2(key_from.public.with_suffix(suffix), key.with_suffix(suffix))
        if not key.with_suffix(".key").exists():
            keygen(key)
        command = [
            SIGNER,
            "sign",
            str(image),
            "--key",
            str(key.with_suffix(".key")),
            "--sequence",
            str(sequence),
            "--device-type",
            DEVICE_TYPE,
            "--channel",
            CHANNEL,
            "--force",
            *extra,
        ]
        if chunk:  # empty: the signer's default
            command += ["--chunk-size", chunk]
        if http_url:
            command += ["--http-url", http_url]
        subprocess.run(command, check=True, capture_output=True)
        return cls(
            directory,
            image,
            image.with_name(image.name + ".manifest.json"),
            key.with_suffix(".pub"),
        )


def publish(release: Release, root: Path) -> None:
    """Lay the release out under `root` at every mirror URL's path (`otacast-signer publish`)."""
    done = subprocess.run(
        [SIGNER, "publish", str(release.manifest), str(release.image), "--root", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def serve_command(
    host: Host,
    release: Release,
    cache: Path,
    *args: str,
    image: Path | None = None,
    json_lines: bool = True,
) -> list[str]:
    """`otacast-signer serve` of `release` (or of another `image` under its manifest) on
    `host`'s eth0, with JSON status lines unless `json_lines` is false.  `args` come last, so
    an ``--interface`` among them is the one used."""
    return host.command(
        SIGNER,
        "serve",
        str(release.manifest),
        str(image or release.image),
        "--interface",
        "eth0",
        "--cache-dir",
        str(cache),
        *(("--json",) if json_lines else ()),
        *args,
    )


def first_start(cache: Path) -> None:
    """Forget the phase origin of every release cached in `cache`, so that the next ``serve``
    from it is a lone sender's first start (round 0 at its start: every chunk's source symbols
    first), as for devices waiting for a new release, rather than a restart that goes on where
    the first start's clock says (`otacast.signer.channels`)."""
    for origin in cache.glob("*.origin"):
        origin.unlink()


def serve(
    host: Host,
    release: Release,
    *args: str,
    ready: bool = False,
    cache: Path | None = None,
    ready_timeout: float | None = None,
    seen: list[dict[str, object]] | None = None,
) -> subprocess.Popen[str]:
    """Start a sender, its symbols cached in `cache` (default: one directory per host beside
    the release); with `ready`, return only once it is sending (its symbols encoded), its
    status lines up to then appended to `seen`: if it exits first, or is not sending within
    `ready_timeout` seconds (then it is killed), raise RuntimeError."""
    process = subprocess.Popen(
        serve_command(host, release, cache or release.directory / f"cache-{host.netns}", *args),
        stdout=subprocess.PIPE if ready else subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    if ready:
        assert process.stdout is not None
        watchdog = threading.Timer(ready_timeout or 0, process.kill)
        if ready_timeout is not None:
            watchdog.start()
        try:
            for line in process.stdout:
                event = json.loads(line)
                if seen is not None:
                    seen.append(event)
                if event.get("event") == "serving":
                    break
            else:
                process.wait()
                raise RuntimeError(f"serve exited with {process.returncode} before sending")
        finally:
            watchdog.cancel()
        # Keep draining its status lines (one a second) so the sender never blocks on them.
        threading.Thread(target=process.stdout.read, daemon=True).start()
    return process


def fetch_command(
    host: Host, release: Release, state: Path, out: Path, *args: str, json_lines: bool = True
) -> list[str]:
    """`otacast fetch` of `release` on `host`'s eth0, JSON lines out unless `json_lines` is
    false; `args` come last."""
    return _device_command("fetch", host, release, state, out, *args, json_lines=json_lines)


def install_command(host: Host, release: Release, state: Path, out: Path, *args: str) -> list[str]:
    """`otacast install`: `fetch_command`'s options, then the installer (an ``--installer`` in
    `args`) is handed the verified image."""
    return _device_command("install", host, release, state, out, *args)


def install(
    host: Host,
    release: Release,
    state: Path,
    out: Path,
    installer: str,
    *args: str,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """`otacast install` with `installer` (``file:…``, ``swupdate:…``), run to its end."""
    return subprocess.run(
        install_command(host, release, state, out, *args, "--installer", installer),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _device_command(
    verb: str,
    host: Host,
    release: Release,
    state: Path,
    out: Path,
    *args: str,
    json_lines: bool = True,
    device: str | None = None,
) -> list[str]:
    return host.command(
        device or DEVICE,
        verb,
        "--trust",
        str(release.public),
        "--interface",
        "eth0",
        "--channel",
        CHANNEL,
        "--state-dir",
        str(state),
        "--out",
        str(out),
        *(("--json",) if json_lines else ()),
        "--device-type",
        DEVICE_TYPE,
        *args,
    )


def start_fetch(
    host: Host, release: Release, state: Path, out: Path, *args: str, device: str | None = None
) -> subprocess.Popen[str]:
    """`otacast fetch` started, its JSON lines and stderr on pipes (text); `device`: another
    ``otacast`` executable than this checkout's."""
    return subprocess.Popen(
        _device_command("fetch", host, release, state, out, *args, device=device),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def fetch(
    host: Host, release: Release, state: Path, out: Path, *args: str, timeout: float = 120
) -> tuple[int, list[dict[str, object]], str]:
    done = subprocess.run(
        fetch_command(host, release, state, out, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, events, done.stderr


def summary_of(events: list[dict[str, object]]) -> dict[str, object]:
    """The ``finished`` summary a fetch ends with (asserted to be there)."""
    assert events and events[-1]["event"] == "finished", events[-3:]
    return events[-1]


def received_datagrams(summary: dict[str, object]) -> int:
    """Every datagram the device's sockets handed it: the core's (the carousel's, and the
    manifest's on the delta lane and the index group) and the lane's and the index group's
    DATA."""
    counts = ("datagrams", "datagrams_lane", "datagrams_index")
    return sum(int(summary[k]) for k in counts)  # type: ignore[call-overload]


# --- A device holding an installed release (the delta lane's devices) --------------------------

SLOT = "slot.img"  # the file installer's target in a device's directory


def verified_manifest(release: Release) -> VerifiedManifest:
    trust = load_trust([release.public], 1)
    return verify_envelope(release.manifest.read_bytes(), trust, check_signature, now=time.time())


def holding(release: Release, directory: Path, *, index: bool = True) -> Path:
    """A device in `directory` whose file installer's target (``SLOT``) holds `release` and
    whose state directory records it as installed the way `deliver` does (`stage_index`, then
    `write_installed`: ``installed.json`` and, unless `index` is false, ``installed.blockindex``);
    the state directory."""
    shutil.copyfile(release.image, directory / SLOT)
    state = directory / "state"
    state.mkdir()
    verified = verified_manifest(release)
    if index:
        assert stage_index(state, verified, release.image)
    write_installed(state, verified, "installed")
    assert (state / INDEX).exists() == index
    return state


@dataclass(frozen=True)
class Timed:
    """A device command run to its end, or killed at its timeout (`returncode` None), with
    the seconds from its start to its exit and to its ``finished`` line (the verified image
    written; None if there was none)."""

    returncode: int | None
    events: list[dict[str, object]]
    stdout: str
    stderr: str
    seconds: float
    to_finished: float | None

    @property
    def summary(self) -> dict[str, object]:
        return summary_of([e for e in self.events if e.get("event") == "finished"])

    @property
    def notes(self) -> list[str]:
        return [str(e["message"]) for e in self.events if e.get("event") == "note"]

    def failure(self) -> str:
        """What to show when it failed: the ends of its stderr and stdout."""
        return f"exit {self.returncode}\n{self.stderr[-2000:]}{self.stdout[-3000:]}"


def run_timed(command: list[str], timeout: float) -> Timed:
    """Run a device command printing JSON lines, noting when its ``finished`` line came."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    finished: list[float] = []
    errors: list[str] = []

    def read_stdout() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if finished or not line.startswith("{"):
                continue
            if json.loads(line).get("event") == "finished":
                finished.append(time.perf_counter() - started)

    def read_stderr() -> None:
        assert process.stderr is not None
        errors.append(process.stderr.read())

    readers = [threading.Thread(target=f, daemon=True) for f in (read_stdout, read_stderr)]
    for reader in readers:
        reader.start()
    try:
        returncode: int | None = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        returncode = None
    seconds = time.perf_counter() - started
    for reader in readers:
        reader.join(10)
    stdout = "".join(lines)
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return Timed(returncode, events, stdout, "".join(errors), seconds, next(iter(finished), None))


def install_into_slot(
    host: Host, release: Release, directory: Path, state: Path, *args: str, timeout: float
) -> Timed:
    """`otacast install` of `release` on `host` into the file installer's target ``SLOT`` of
    the device in `directory` (as `holding` made it), timed."""
    command = install_command(
        host,
        release,
        state,
        directory / "out.img",
        "--installer",
        f"file:{directory / SLOT}",
        "--join-timeout",
        "30",
        *args,
    )
    return run_timed(command, timeout)


def _loss_place(host: Host) -> tuple[list[str], str, str]:
    """Where `host`'s loss rule goes: (command prefix, table, chain declaration).  In the host
    itself, or with GRO on its link at the switch port facing it, before GRO coalesces: a rule
    in the host would drop whole coalesced runs of up to 64 datagrams, not datagrams."""
    if host.gro_port is None:
        hook = "input { type filter hook input priority 0 ; }"
        return host.command("nft"), "inet otacast_loss", hook
    switch, port = host.gro_port
    hook = "forward { type filter hook forward priority 0 ; }"
    return ["ip", "netns", "exec", switch, "nft"], f"bridge otacast_loss_{port}", hook


def random_loss(host: Host, percent: int, port: int = 4242) -> None:
    """Drop `percent`% of datagrams to `port` arriving at `host` at random (nftables, in `host`,
    or at its switch port when its link has GRO)."""
    nft, table, chain = _loss_place(host)
    match = "" if host.gro_port is None else f'oifname "{host.gro_port[1]}" '
    for rule in (
        f"add table {table}",
        f"add chain {table} {chain}",
        f"add rule {table} {chain.split()[0]} {match}udp dport {port} "
        f"numgen random mod 100 < {percent} counter drop",
    ):
        done = subprocess.run([*nft, rule], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"nft {rule}: {done.stderr.strip()}")


def clear_loss(host: Host) -> None:
    """Remove `host`'s loss rule, if any."""
    nft, table, _ = _loss_place(host)
    subprocess.run([*nft, f"delete table {table}"], capture_output=True, check=False)


def dropped(host: Host) -> int:
    nft, table, _ = _loss_place(host)
    listing = subprocess.run(
        [*nft, "-j", "list", "table", *table.split()], capture_output=True, text=True, check=False
    ).stdout
    for item in json.loads(listing)["nftables"]:
        rule = item.get("rule")
        if rule:
            for expression in rule["expr"]:
                if "counter" in expression:
                    return int(expression["counter"]["packets"])
    return 0
