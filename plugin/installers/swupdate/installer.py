"""``swupdate:DIR``: stream the verified ``.swu`` into a running swupdate daemon (its IPC).

``swupdate:DIR`` (`SwupdateIpcInstaller`) talks to a ``swupdate`` daemon through the two sockets
it creates in its ``TMPDIR`` (``DIR``; Debian's ``swupdate.socket`` uses ``/tmp``).  Message
layouts are in `ipc` (beside this module).  The sequence:

1. Connect to the progress socket ``DIR/swupdateprog`` first, so no record of our install can be
   written before we listen.
2. Connect to ``DIR/sockinstctrl`` and send ``REQ_INSTALL`` (API version 1, source LOCAL, run
   type INSTALL, the image length, info ``otacast NAME VERSION``) as one write; read one
   ``ipc_message`` back.  ``NACK`` means busy ("Installation in progress") or refused.
3. After ``ACK``, open a second control connection and subscribe with ``NOTIFY_STREAM``.  The
   daemon replays its cached log messages on it, then sends each new one; they carry the reasons
   a ``FAILURE`` has ("ERROR : Authentication of all signatures failed"), which the progress
   records do not.  Subscribing only now matters: the daemon's single network thread writes the
   replay with blocking writes before it serves the next request, and its cache holds up to 100
   messages (312 KB, more than the default 208 KB socket buffer), but accepting an install
   empties it.  A daemon that refuses the subscription still installs, only with terser errors.
4. Progress records already buffered were written before our request was accepted (the daemon
   only accepts while idle, and our install produces no record before it has read image bytes),
   so they are discarded.  Then the image bytes are written on the control connection; closing
   it marks the end of the image.
5. Progress records are read until ``SUCCESS`` or ``FAILURE``.  Streaming, progress and
   notifications are multiplexed in one ``select`` loop: the daemon writes progress and
   notifications with blocking writes while it reads the image, so a client that only wrote
   could deadlock it (seen: a second progress client that stops reading stalls the whole
   install until it reads again).  If the daemon stops reading (it rejected the image
   part-way), the write fails with EPIPE and the verdict still comes from the progress socket.
6. After the verdict the notifications are read a little longer, until the daemon reports idle:
   the messages that explain a ``FAILURE`` can lag its progress record, and a daemon that has
   reported ``SUCCESS`` but not yet idle NACKs the next request as busy (seen often with
   back-to-back installs).  The reason of a failure is the first error-level message since the
   daemon announced the start of our install.

An accepted install that never starts is retried.  swupdate 2022.12's installer thread waits for
work with a bare ``pthread_cond_wait``; a request that arrives while it is finishing the previous
install (after it reported idle, before it waits again) is acknowledged, but its wake-up is lost
and the daemon never reads the image (seen in 3 of 140 back-to-back installs here).
A started install announces ``START`` on the notification stream at once, so when neither that
nor a progress record arrives within `START_TIMEOUT` the request is made again on fresh
connections: the next request does wake the thread, and the image is sent from its beginning.
Without a notification stream this cannot be seen and only the overall timeout applies.

The notification stream also backs up the progress socket.  The daemon's progress thread
accepts connections on its own schedule and sends each record only to the clients it has
accepted by then, so a fast install (a rejected signature takes ~2 ms) can be over before our
progress connection counts (the likely cause of the one missed verdict seen in ~700 installs
here).  When the notifications say our install is over (idle after ``START``) and no verdict
record follows within `SETTLE_TIMEOUT`, the verdict is the last ``SUCCESS``/``FAILURE`` status
the notifications carried (``FAILURE`` if none).

Whoever created the sockets is checked before anything they say is believed.  ``DIR`` is often
``/tmp``, where any local user can create ``sockinstctrl`` and ``swupdateprog`` before the daemon
starts (or while it is down) and answer ``ACK`` and ``SUCCESS`` to an install that never
happened.  So each socket file must be a socket owned by a trusted user, and the process that
listens on it, as the kernel reports it (``SO_PEERCRED``, the credentials of the peer when it
called ``listen``, which the peer cannot forge), must run as a trusted user; otherwise the install
fails with a one-line error before a request is sent.  The trusted users are root, the user
otacast runs as (its own sockets, e.g. ``swupdate-run``'s private daemon), and the owner named
in the installer's configuration for a daemon run as another user (``swupdate:USER@DIR``).

``SUCCESS`` is reported as ``installed``.  Whether the update is active now or after a reboot is
decided inside the ``.swu`` (handlers, bootloader variables, scripts) and SWUpdate's IPC does
not say; a device whose updates need a reboot reboots from the update's own post-install
script or from its update loop.

Both SWUpdate installers (this one and ``swupdate-run``, `run.py`) refuse a release whose signed
image format is not ``swu`` before touching swupdate (`swu_release`).  Every
failure is an `InstallError` with one line; the image is only ever opened for reading.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import selectors
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from otacast.plugin.errors import InstallError, InstallerUnavailable
from otacast.plugin.installers.base import Installer, InstallResult
from otacast.schemas.manifest import Manifest
from otacast.schemas.policy import VerifiedManifest

from .ipc import (
    INFO_LEN,
    NATIVE,
    Abi,
    InstallRequest,
    IpcFormatError,
    IpcMessage,
    MsgType,
    NotifyLevel,
    ProgressMsg,
    RecoveryStatus,
    build_ipc_message,
    enum_name,
    ipc_message_size,
    parse_ipc_message,
    parse_progress_msg,
    progress_msg_size,
)

CONTROL_SOCKET = "sockinstctrl"
PROGRESS_SOCKET = "swupdateprog"
# Installing a multi-GB image to slow flash takes minutes, not hours (as for command:).
DEFAULT_TIMEOUT = 3600.0
# The daemon's network thread answers a request from memory at once; this only bounds the wait
# on a wedged daemon.
REPLY_TIMEOUT = 30.0
# The image goes to the daemon in pieces of this size: big enough that syscalls do not matter,
# small enough that the loop keeps reading progress while the daemon is busy writing flash.
STREAM_CHUNK = 256 * 1024
# A step reports at most ~101 PROGRESS records (one per percent) plus a few state changes; a
# million records is ~10,000 steps, far beyond any real .swu, and bounds a daemon that spins.
MAX_PROGRESS_RECORDS = 1_000_000
# A woken installer thread announces START within milliseconds; ten seconds leaves room for a
# loaded device and still retries a lost wake-up (module doc) long before the overall timeout.
START_TIMEOUT = 10.0
# Lost wake-ups are rare; a third in a row means something else is wrong with the daemon.
START_ATTEMPTS = 3
# After the verdict, wait at most this long for the daemon to report idle (module doc, step 6).
# It does so within milliseconds; this only bounds a daemon whose notifications stop.
SETTLE_TIMEOUT = 2.0
# Keep this many error messages of one install for the reason (the first one is the cause).
MAX_ERRORS = 20
# Keep at most this much of any text reported in an error line.
MAX_REASON = 300


@dataclass
class _Stream:
    """One socket read as a sequence of fixed-size records."""

    sock: socket.socket
    record_size: int
    buffer: bytearray = field(default_factory=bytearray)
    closed: bool = False

    def fill(self) -> None:
        """Read what is available (the socket is non-blocking)."""
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ECONNRESET: the daemon went away
                self.closed = True
                return
            if not data:
                self.closed = True
                return
            self.buffer += data

    def records(self) -> list[bytes]:
        n = len(self.buffer) // self.record_size * self.record_size
        chunk = bytes(self.buffer[:n])
        del self.buffer[:n]
        return [chunk[i : i + self.record_size] for i in range(0, n, self.record_size)]


@dataclass
class _Reasons:
    """What the notification stream tells of the current install: its state and errors."""

    errors: list[str] = field(default_factory=list)
    started: bool = False  # the daemon announced START
    idle: bool = False  # ... and then reported idle again: the install is over
    outcome: int | None = None  # SUCCESS or FAILURE, as the notifications tell it

    def add(self, status: int, level: int, message: str) -> None:
        if status == RecoveryStatus.START:
            # A new install starts: what came before (the replayed cache) belongs to others.
            self.errors.clear()
            self.idle = False
            self.started = True
            self.outcome = None
        elif status == RecoveryStatus.IDLE and self.started:
            self.idle = True  # our install is over
        elif status in (RecoveryStatus.SUCCESS, RecoveryStatus.FAILURE) and self.started:
            self.outcome = status
        if level == NotifyLevel.ERROR and len(self.errors) < MAX_ERRORS:
            text = error_text(message)
            if text and text not in self.errors:
                self.errors.append(text)

    def summary(self) -> str:
        if not self.errors:
            return ""
        first = self.errors[0]
        return first if len(self.errors) == 1 else f"{first} (then: {self.errors[-1]})"


class _NotStarted(Exception):
    """The daemon acknowledged the request but its installer thread did not start."""


class SwupdateIpcInstaller(Installer):
    kind = "swupdate"

    def __init__(
        self,
        directory: Path,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        abi: Abi = NATIVE,
        owner: int | None = None,
    ) -> None:
        """`owner`: the uid the daemon runs as, when it is neither root nor otacast's own."""
        self.directory = directory
        self.trusted = frozenset({0, os.geteuid()} | ({owner} if owner is not None else set()))
        self.control = directory / CONTROL_SOCKET
        self.progress = directory / PROGRESS_SOCKET
        self.timeout = timeout
        self.start_timeout = START_TIMEOUT
        self.settle_timeout = SETTLE_TIMEOUT
        self.abi = abi
        self.message_size = ipc_message_size(abi)
        self.record_size = progress_msg_size(abi)

    def install(self, image: Path, verified: VerifiedManifest) -> InstallResult:
        m = swu_release(verified)
        info = _fit(clean_line(f"otacast {m.name} {m.version}"), INFO_LEN - 1)
        deadline = time.monotonic() + self.timeout
        if not self.control.exists():
            raise InstallerUnavailable(
                f"swupdate is not running: no control socket at {self.control} (start the "
                "daemon with TMPDIR set to that directory, or name the directory it uses)"
            )
        for _ in range(START_ATTEMPTS):
            try:
                verdict, reasons = self._attempt(image, info, deadline)
                break
            except _NotStarted:
                continue  # a lost wake-up (module doc): ask again
        else:
            raise InstallError(
                f"swupdate accepted the install {START_ATTEMPTS} times but never started it "
                f"(nothing within {self.start_timeout:g} s each time; restart the daemon)"
            )
        if verdict.status == RecoveryStatus.SUCCESS:
            return InstallResult("installed", f"swupdate installed {m.name} {m.version}")
        reason = reasons.summary() or "no reason given (see the swupdate daemon's log)"
        raise InstallError(f"swupdate reported FAILURE installing {m.name} {m.version}: {reason}")

    def post_update(self) -> None:
        """Ask the daemon to run its post-update command (``-p``), as ``swupdate -i`` does after
        a successful install; a daemon without one acknowledges at once."""
        with self._connect(self.control, "control") as control:
            answer = self._exchange(control, MsgType.POST_UPDATE, None)
        if answer.type != MsgType.ACK:
            text = clean_line(answer.text().msg)
            raise InstallError(
                "swupdate installed the update but its post-update command failed"
                + (f": {text}" if text else "")
            )

    def _attempt(self, image: Path, info: str, deadline: float) -> tuple[ProgressMsg, _Reasons]:
        """One request and, if it is accepted, the whole install (steps 1-6 of the module doc)."""
        try:
            handle = image.open("rb")
        except OSError as exc:
            raise InstallError(f"cannot read image {image}: {exc.strerror or exc}") from None
        with contextlib.ExitStack() as stack:
            stack.enter_context(handle)
            size = os.fstat(handle.fileno()).st_size
            progress = stack.enter_context(self._connect(self.progress, "progress"))
            control = stack.enter_context(self._connect(self.control, "control"))
            self._request(control, InstallRequest(length=size, info=info))
            notify = self._subscribe(stack)
            return self._follow(handle, control, progress, notify, deadline)

    # --- connections ------------------------------------------------------------------------

    def _connect(self, path: Path, role: str) -> socket.socket:
        self._check_owner(path, role)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(REPLY_TIMEOUT)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            sock.close()
            raise InstallerUnavailable(
                f"swupdate is not running: no {role} socket at {path}"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise InstallerUnavailable(
                f"swupdate is not running: {role} socket {path} refuses connections "
                "(left over from a daemon that exited?)"
            ) from None
        except OSError as exc:
            sock.close()
            raise InstallError(
                f"cannot connect to swupdate's {role} socket {path}: {exc.strerror or exc}"
            ) from None
        try:
            self._check_peer(sock, path, role)
        except BaseException:
            sock.close()
            raise
        return sock

    def _trusted_users(self) -> str:
        names = sorted(_user_name(uid) for uid in self.trusted)
        return " or ".join(names)

    def _check_owner(self, path: Path, role: str) -> None:
        """The socket file must be a socket that a trusted user created (module doc)."""
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            raise InstallerUnavailable(
                f"swupdate is not running: no {role} socket at {path}"
            ) from None
        except OSError as exc:
            raise InstallError(
                f"cannot use swupdate's {role} socket {path}: {exc.strerror or exc}"
            ) from None
        if not stat.S_ISSOCK(info.st_mode):
            raise InstallError(f"swupdate's {role} socket {path} is not a socket")
        if info.st_uid not in self.trusted:
            raise InstallError(
                f"swupdate's {role} socket {path} belongs to {_user_name(info.st_uid)}, not "
                f"{self._trusted_users()}: refusing to trust it (another user may have created "
                "it; name the daemon's user as swupdate:USER@DIR if it runs as that user)"
            )

    def _check_peer(self, sock: socket.socket, path: Path, role: str) -> None:
        """The process listening on the socket must run as a trusted user (module doc)."""
        try:
            _, uid, _ = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
        except (OSError, struct.error) as exc:
            raise InstallError(
                f"cannot tell who serves swupdate's {role} socket {path}: {exc}"
            ) from None
        if uid not in self.trusted:
            raise InstallError(
                f"swupdate's {role} socket {path} is served by a process of "
                f"{_user_name(uid)}, not {self._trusted_users()}: refusing to trust its answers"
            )

    def _exchange(
        self, sock: socket.socket, msgtype: int, member: InstallRequest | None
    ) -> IpcMessage:
        """Send one control message in one write; return the one reply."""
        message = build_ipc_message(msgtype, member, self.abi)
        try:
            # The daemon reads a message with one read and drops short ones, so a partial send
            # cannot be completed later: it has to go in one piece (it does on AF_UNIX).
            if sock.send(message) != len(message):
                raise InstallError("swupdate control socket took only part of a message")
            reply = _recv_exact(sock, self.message_size)
        except TimeoutError:
            raise InstallError(
                f"swupdate did not answer on {self.control} within {REPLY_TIMEOUT:g} s"
            ) from None
        except OSError as exc:
            raise InstallError(
                f"swupdate control socket {self.control} failed: {exc.strerror or exc}"
            ) from None
        if len(reply) != self.message_size:
            raise InstallError(
                f"swupdate closed the control connection after {len(reply)} bytes of a "
                f"{self.message_size}-byte reply (a daemon of another version or ABI?)"
            )
        try:
            return parse_ipc_message(reply, self.abi)
        except IpcFormatError as exc:
            raise InstallError(f"swupdate sent a malformed reply: {exc}") from None

    def _subscribe(self, stack: contextlib.ExitStack) -> _Stream | None:
        """The notification stream, or None: the install is accepted by now, and the messages
        only explain a failure, so going without them beats abandoning the install."""
        try:
            sock = stack.enter_context(self._connect(self.control, "control"))
            if self._exchange(sock, MsgType.NOTIFY_STREAM, None).type != MsgType.ACK:
                return None  # an older daemon: install without the log messages
        except InstallError:
            return None
        sock.setblocking(False)
        return _Stream(sock, self.message_size)

    def _request(self, control: socket.socket, request: InstallRequest) -> None:
        answer = self._exchange(control, MsgType.REQ_INSTALL, request)
        reply = answer.type
        if reply == MsgType.ACK:
            return
        text = clean_line(answer.text().msg)
        if reply == MsgType.NACK and "progress" in text.lower():
            raise InstallerUnavailable(f"swupdate is busy: {text}")
        if reply == MsgType.NACK:
            raise InstallError(
                "swupdate refused the install request"
                + (f": {text}" if text else " (API version, software set or mode not accepted)")
            )
        raise InstallError(
            f"swupdate answered the install request with {enum_name(MsgType, reply)}"
        )

    # --- the install ------------------------------------------------------------------------

    def _follow(
        self,
        image: BinaryIO,
        control: socket.socket,
        progress: socket.socket,
        notify: _Stream | None,
        deadline: float,
    ) -> tuple[ProgressMsg, _Reasons]:
        with selectors.DefaultSelector() as selector:
            run = _Run(self, selector, image, control, _Stream(progress, self.record_size), notify)
            return run.loop(deadline)


class _Run:
    """Steps 4-6 of the module doc: one select loop over the image stream, progress, notify."""

    def __init__(
        self,
        installer: SwupdateIpcInstaller,
        selector: selectors.BaseSelector,
        image: BinaryIO,
        control: socket.socket,
        progress: _Stream,
        notify: _Stream | None,
    ) -> None:
        self.installer = installer
        self.image = image
        self.control: socket.socket | None = control
        self.progress = progress
        self.notify = notify
        self.reasons = _Reasons()
        self.pending = b""
        self.seen = 0
        self.last: ProgressMsg | None = None
        self.verdict: ProgressMsg | None = None
        self.selector = selector

    def loop(self, deadline: float) -> tuple[ProgressMsg, _Reasons]:
        size = self.installer.record_size
        for sock in (self.progress.sock, self.control):
            assert sock is not None
            sock.setblocking(False)
        # Records already buffered were written before the daemon accepted our request:
        # skip them, including one that has only partly arrived.
        self.progress.fill()
        stale = -(-len(self.progress.buffer) // size)
        self.selector.register(self.progress.sock, selectors.EVENT_READ)
        if self.notify is not None:
            self.selector.register(self.notify.sock, selectors.EVENT_READ)
        assert self.control is not None
        self.selector.register(self.control, selectors.EVENT_WRITE)
        settle = self.installer.settle_timeout
        grace_end: float | None = None  # set once the verdict is in
        idle_since: float | None = None  # the notifications say the install is over
        # Only a notification stream shows that an accepted install has started (module doc).
        start_by = time.monotonic() + self.installer.start_timeout
        while True:
            now = time.monotonic()
            waiting_for_start = (
                self.notify is not None and not self.reasons.started and self.seen == 0
            )
            if waiting_for_start and now >= start_by:
                raise _NotStarted
            if grace_end is not None and (
                now >= grace_end or self.reasons.idle or self.notify is None
            ):
                assert self.verdict is not None
                return self.verdict, self.reasons
            if grace_end is None and self.reasons.idle:
                # The daemon writes the verdict record before it reports idle, so it is late
                # only if this connection missed it (module doc): take the notifications' word.
                idle_since = now if idle_since is None else idle_since
                if now >= idle_since + settle:
                    outcome = self.reasons.outcome or RecoveryStatus.FAILURE
                    return ProgressMsg(outcome), self.reasons
            if now >= deadline:
                raise InstallError(
                    f"swupdate did not report SUCCESS or FAILURE within "
                    f"{self.installer.timeout:g} s" + self._last_words("; last: ")
                )
            until = deadline if grace_end is None else min(deadline, grace_end)
            if waiting_for_start:
                until = min(until, start_by)
            if idle_since is not None:
                until = min(until, idle_since + settle)
            for key, _ in self.selector.select(until - now):
                if key.fileobj is self.control:
                    self._feed()
                elif self.notify is not None and key.fileobj is self.notify.sock:
                    self._read_notify()
                elif grace_end is None:
                    stale = self._read_progress(stale)
            if self.verdict is not None and grace_end is None:
                # Stop sending (after FAILURE the rest is unwanted) and let the daemon settle.
                self._end_image()
                self.selector.unregister(self.progress.sock)
                grace_end = time.monotonic() + settle

    def _feed(self) -> None:
        """The control connection is writable: send the next piece of the image."""
        assert self.control is not None
        if not self.pending:
            self.pending = self.image.read(STREAM_CHUNK)
            if not self.pending:
                self._end_image()
                return
        try:
            self.pending = self.pending[self.control.send(self.pending) :]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            # EPIPE/ECONNRESET: the daemon stopped reading (it rejected the image part-way);
            # the verdict still comes on the progress socket.
            self._end_image()

    def _end_image(self) -> None:
        """Close the control connection: to the daemon, the end of the image."""
        if self.control is not None:
            self.selector.unregister(self.control)
            self.control.close()
            self.control = None

    def _read_notify(self) -> None:
        assert self.notify is not None
        self.notify.fill()
        for raw in self.notify.records():
            try:
                note = parse_ipc_message(raw, self.installer.abi).notify()
            except IpcFormatError:
                continue  # a notification only ever explains; never fail over one
            self.reasons.add(note.status, note.level, note.msg)
        if self.notify.closed:
            self.selector.unregister(self.notify.sock)
            self.notify = None

    def _read_progress(self, stale: int) -> int:
        self.progress.fill()
        for raw in self.progress.records():
            if stale:
                stale -= 1
                continue
            self.seen += 1
            if self.seen > MAX_PROGRESS_RECORDS:
                raise InstallError(
                    f"swupdate sent more than {MAX_PROGRESS_RECORDS} progress records "
                    "without a result"
                )
            try:
                self.last = parse_progress_msg(raw, self.installer.abi)
            except IpcFormatError as exc:
                raise InstallError(f"swupdate sent a malformed progress record: {exc}") from None
            if self.last.status in (RecoveryStatus.SUCCESS, RecoveryStatus.FAILURE):
                self.verdict = self.last
                return stale
        if self.progress.closed:
            raise InstallError(
                "swupdate closed its progress socket before reporting SUCCESS or FAILURE "
                "(did the daemon exit?)" + self._last_words("; last: ")
            )
        return stale

    def _last_words(self, prefix: str) -> str:
        return prefix + _describe(self.last) if self.last else ""


# --- helpers -------------------------------------------------------------------------------------


def swu_release(verified: VerifiedManifest) -> Manifest:
    """The release's manifest, if its signed image format is one swupdate installs."""
    m = verified.manifest
    if m.image.format != "swu":
        raise InstallError(
            f"swupdate installs .swu images; {m.name} {m.version} is a {m.image.format!r} image "
            "(a .swu is signed with --format swu, the default for a .swu file name)"
        )
    return m


# struct ucred: pid, uid, gid (Linux).
_PEERCRED = struct.Struct("=iII")


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def owner_uid(name: str) -> int:
    """The uid of a user named in ``swupdate:USER@DIR`` (a name or a number)."""
    if name.isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise InstallError(f"swupdate installer: no user {name!r} on this system") from None


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _fit(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes without splitting a character."""
    return text.encode()[:limit].decode(errors="ignore")


def clean_line(text: str) -> str:
    """One printable line of at most MAX_REASON characters."""
    line = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return line[:MAX_REASON]


# "[ERROR] : SWUPDATE failed [0] ERROR : Authentication ...", "ERROR : ...", "Error: ..."
_ERROR_PREFIX = re.compile(
    r"^(?:\[ERROR\]\s*:\s*SWUPDATE failed \[\d+\]\s*)?(?:ERROR\s*:\s*|Error:\s*)?"
)


def error_text(message: str) -> str:
    return clean_line(_ERROR_PREFIX.sub("", message.strip(), count=1))


def _describe(record: ProgressMsg) -> str:
    text = f"{record.status_name}, step {record.cur_step}/{record.nsteps}"
    if record.cur_image:
        text += f" {clean_line(record.cur_image)}"
    return f"{text} {record.cur_percent}%"
