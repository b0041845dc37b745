"""SWUpdate IPC layouts (sizes and offsets measured against the C headers) and the SWUpdate
installers against a scripted fake daemon on AF_UNIX sockets in a temporary directory."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import random
import shutil
import signal
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otacast.plugin.errors import InstallError, InstallerUnavailable
from otacast.plugin.installers import get_installer
from otacast.plugin.installers.swupdate import SwupdateIpcInstaller, SwupdateRunInstaller, ipc
from otacast.plugin.installers.swupdate.ipc import (
    ILP32_EABI,
    ILP32_I386,
    LP64,
    NATIVE,
    Abi,
    InstallRequest,
    IpcFormatError,
    MsgType,
    Notify,
    ProgressMsg,
    RecoveryStatus,
    RunType,
    SourceType,
    Status,
    Text,
)
from otacast.schemas.policy import VerifiedManifest
from otacast.signer.keys import SigningKey

from .helpers import make_release, read_only_file, shell_script

BIG_ENDIAN_LP64 = Abi("big-endian LP64", "big", 8, 8)  # e.g. ppc64, s390x
ABIS = [LP64, ILP32_EABI, ILP32_I386, BIG_ENDIAN_LP64]
KEY = SigningKey(b"\x0b" * 32)
IMAGE = random.Random(5).randbytes(300_000)


# --- Layouts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("abi", "message", "progress"),
    [(LP64, 3120, 2416), (ILP32_EABI, 3104, 2416), (ILP32_I386, 3104, 2408)],
)
def test_struct_sizes_match_the_c_headers(abi: Abi, message: int, progress: int) -> None:
    # LP64 and armhf were measured with offsetof/sizeof against the 2022.12 headers; the daemon
    # drops an ipc_message of any other size, so this is the cheapest sanity check.
    assert ipc.ipc_message_size(abi) == message
    assert ipc.progress_msg_size(abi) == progress


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="LP64 machines only")
def test_the_native_abi_of_an_lp64_machine_is_lp64() -> None:
    assert NATIVE == LP64
    assert ipc.ipc_message_size() == 3120 and ipc.progress_msg_size() == 2416


# The C declarations, transcribed with ctypes: the C compiler's own layout rules on this machine,
# independent of the field lists in the ipc module.
class _CRequest(ctypes.Structure):
    _fields_ = [
        ("apiversion", ctypes.c_uint32),
        ("source", ctypes.c_int),
        ("dry_run", ctypes.c_int),
        ("len", ctypes.c_size_t),
        ("info", ctypes.c_char * 512),
        ("software_set", ctypes.c_char * 256),
        ("running_mode", ctypes.c_char * 256),
        ("disable_store_swu", ctypes.c_bool),
    ]


class _CInstmsg(ctypes.Structure):
    _fields_ = [("req", _CRequest), ("len", ctypes.c_uint32), ("buf", ctypes.c_char * 2048)]


class _CStatus(ctypes.Structure):
    _fields_ = [
        ("current", ctypes.c_int),
        ("last_result", ctypes.c_int),
        ("error", ctypes.c_int),
        ("desc", ctypes.c_char * 2048),
    ]


class _CUnion(ctypes.Union):
    _fields_ = [("msg", ctypes.c_char * 128), ("instmsg", _CInstmsg), ("status", _CStatus)]


class _CMessage(ctypes.Structure):
    _fields_ = [("magic", ctypes.c_int), ("type", ctypes.c_int), ("data", _CUnion)]


class _CProgress(ctypes.Structure):
    _fields_ = [
        ("magic", ctypes.c_uint),
        ("status", ctypes.c_int),
        ("dwl_percent", ctypes.c_uint),
        ("dwl_bytes", ctypes.c_ulonglong),
        ("nsteps", ctypes.c_uint),
        ("cur_step", ctypes.c_uint),
        ("cur_percent", ctypes.c_uint),
        ("cur_image", ctypes.c_char * 256),
        ("hnd_name", ctypes.c_char * 64),
        ("source", ctypes.c_int),
        ("infolen", ctypes.c_uint),
        ("info", ctypes.c_char * 2048),
    ]


def test_the_native_layout_agrees_with_the_c_compilers_layout_via_ctypes() -> None:
    assert ctypes.sizeof(_CMessage) == ipc.ipc_message_size()
    assert ctypes.sizeof(_CProgress) == ipc.progress_msg_size()
    c = _CMessage(magic=ipc.IPC_MAGIC, type=MsgType.REQ_INSTALL)
    req = c.data.instmsg.req
    req.apiversion, req.source, req.dry_run, req.len = 1, 4, 2, 123_456_789
    req.info, req.software_set, req.running_mode = b"otacast a 1", b"stable", b"main"
    req.disable_store_swu = True
    ours = ipc.build_ipc_message(
        MsgType.REQ_INSTALL,
        InstallRequest(
            123_456_789,
            "otacast a 1",
            software_set="stable",
            running_mode="main",
            disable_store_swu=True,
        ),
    )
    assert ours == bytes(c)
    p = _CProgress(status=8, dwl_percent=7, dwl_bytes=2**40 + 3, nsteps=2, cur_step=1)
    p.cur_percent, p.cur_image, p.hnd_name, p.source = 55, b"rootfs", b"raw", 4
    p.info, p.infolen = b"{}", 2
    built = ipc.build_progress_msg(
        ProgressMsg(8, 7, 2**40 + 3, 2, 1, 55, "rootfs", "raw", SourceType.LOCAL, "{}")
    )
    assert built == bytes(p)


def _golden_request(abi: Abi) -> bytes:
    return ipc.build_ipc_message(
        MsgType.REQ_INSTALL,
        InstallRequest(
            length=0x11223344,
            info="otacast rootfs 1.2.3",
            software_set="stable",
            running_mode="main",
            disable_store_swu=True,
        ),
        abi,
    )


@pytest.mark.parametrize(
    ("abi", "len_at", "info_at", "set_at", "mode_at", "store_at"),
    # Offsets inside the request (the union starts at 8), from offsetof against the headers.
    [(LP64, 16, 24, 536, 792, 1048), (ILP32_EABI, 12, 16, 528, 784, 1040)],
)
def test_a_req_install_has_its_fields_at_the_c_offsets(
    abi: Abi, len_at: int, info_at: int, set_at: int, mode_at: int, store_at: int
) -> None:
    data = _golden_request(abi)
    assert data[0:4] == b"\x01\x20\x05\x14"  # magic 0x14052001, little-endian
    assert data[4:8] == b"\0\0\0\0"  # REQ_INSTALL
    u = 8
    assert struct.unpack_from("<Iii", data, u) == (1, SourceType.LOCAL, RunType.INSTALL)
    assert data[u + 12 : u + len_at] == bytes(len_at - 12)  # padding before size_t on LP64
    assert int.from_bytes(data[u + len_at : u + info_at], "little") == 0x11223344
    assert data[u + info_at : u + info_at + 21] == b"otacast rootfs 1.2.3\0"
    assert data[u + set_at : u + set_at + 7] == b"stable\0"
    assert data[u + mode_at : u + mode_at + 5] == b"main\0"
    assert data[u + store_at] == 1
    # Everything else (instmsg.len, instmsg.buf, padding) is zero.
    assert data[u + store_at + 1 :] == bytes(len(data) - u - store_at - 1)


def test_a_big_endian_abi_writes_the_same_fields_in_network_order() -> None:
    data = _golden_request(BIG_ENDIAN_LP64)
    assert len(data) == 3120
    assert data[0:4] == b"\x14\x05\x20\x01"
    assert struct.unpack_from(">Iii", data, 8) == (1, SourceType.LOCAL, RunType.INSTALL)
    assert data[8 + 16 : 8 + 24] == (0x11223344).to_bytes(8, "big")


def test_status_notify_and_nack_text_sit_at_the_start_of_the_union() -> None:
    cases: list[tuple[ipc.Member, bytes]] = [
        (Status(1, 4, 7, "busy"), struct.pack("<iii", 1, 4, 7) + b"busy\0"),
        (Notify(4, 1, 1, "ERROR : x"), struct.pack("<iii", 4, 1, 1) + b"ERROR : x\0"),
        (Text("Installation in progress"), b"Installation in progress\0"),
    ]
    for member, head in cases:
        data = ipc.build_ipc_message(MsgType.ACK, member, LP64)
        assert data[8 : 8 + len(head)] == head


def _progress_bytes(abi: Abi, *, dwl_at: int, info_at: int, size: int) -> bytes:
    """A progress_msg placed by hand at the offsets measured against the headers."""
    data = bytearray(size)
    struct.pack_into("<Iii", data, 0, 0, RecoveryStatus.PROGRESS, 42)
    struct.pack_into("<Q", data, dwl_at, 2**33 + 5)
    struct.pack_into("<III", data, dwl_at + 8, 3, 2, 77)
    cur_image = dwl_at + 20
    data[cur_image : cur_image + 12] = b"\0ayload.bin\0"  # a cleared string keeps its tail
    data[cur_image + 256 : cur_image + 256 + 8] = b"rawfile\0"
    struct.pack_into("<iI", data, info_at - 8, SourceType.LOCAL, 11)
    data[info_at : info_at + 20] = b'{"0": {}}\0garbage!!!'
    return bytes(data)


@pytest.mark.parametrize(
    ("abi", "dwl_at", "info_at", "size"),
    [(LP64, 16, 364, 2416), (ILP32_EABI, 16, 364, 2416), (ILP32_I386, 12, 360, 2408)],
)
def test_a_progress_record_parses_at_the_c_offsets_and_ignores_garbage_after_nul(
    abi: Abi, dwl_at: int, info_at: int, size: int
) -> None:
    parsed = ipc.parse_progress_msg(
        _progress_bytes(abi, dwl_at=dwl_at, info_at=info_at, size=size), abi
    )
    assert parsed == ProgressMsg(
        status=RecoveryStatus.PROGRESS,
        dwl_percent=42,
        dwl_bytes=2**33 + 5,
        nsteps=3,
        cur_step=2,
        cur_percent=77,
        cur_image="",
        hnd_name="rawfile",
        source=SourceType.LOCAL,
        info='{"0": {}}',
    )
    assert parsed.status_name == "PROGRESS"


# --- Round trips and hostile input ---------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8", exclude_characters="\0"))
_i32 = st.integers(-(2**31), 2**31 - 1)
_u32 = st.integers(0, 2**32 - 1)


def _fits(limit: int) -> st.SearchStrategy[str]:
    return _text.filter(lambda s: len(s.encode()) < limit)


@st.composite
def _members(draw: st.DrawFn, abi: Abi) -> ipc.Member:
    kind = draw(st.sampled_from(["request", "status", "notify", "text"]))
    if kind == "request":
        return InstallRequest(
            length=draw(st.integers(0, 2 ** (8 * abi.size_t) - 1)),
            info=draw(_fits(512)),
            source=draw(_i32),
            run_type=draw(_i32),
            software_set=draw(_fits(256)),
            running_mode=draw(_fits(256)),
            disable_store_swu=draw(st.booleans()),
            apiversion=draw(_u32),
        )
    if kind == "text":
        return Text(draw(_fits(128)))
    cls = Status if kind == "status" else Notify
    return cls(draw(_i32), draw(_i32), draw(_i32), draw(_fits(2048)))


@given(st.data(), st.sampled_from(ABIS), _i32)
def test_every_member_round_trips_through_an_ipc_message(
    data: st.DataObject, abi: Abi, msgtype: int
) -> None:
    member = data.draw(_members(abi))
    message = ipc.parse_ipc_message(ipc.build_ipc_message(msgtype, member, abi), abi)
    assert message.type == msgtype
    decode = {
        InstallRequest: message.install_request,
        Status: message.status,
        Notify: message.notify,
        Text: message.text,
    }[type(member)]
    assert decode() == member


@given(
    st.sampled_from(ABIS),
    st.builds(
        ProgressMsg,
        status=_i32,
        dwl_percent=_u32,
        dwl_bytes=st.integers(0, 2**64 - 1),
        nsteps=_u32,
        cur_step=_u32,
        cur_percent=_u32,
        cur_image=_fits(256),
        hnd_name=_fits(64),
        source=_i32,
        info=_fits(2048),
        magic=_u32,
    ),
)
def test_progress_records_round_trip(abi: Abi, record: ProgressMsg) -> None:
    assert ipc.parse_progress_msg(ipc.build_progress_msg(record, abi), abi) == record


@given(st.sampled_from(ABIS), st.binary(max_size=4000))
def test_arbitrary_bytes_parse_or_raise_ipc_format_error_only(abi: Abi, data: bytes) -> None:
    for parse in (ipc.parse_progress_msg, ipc.parse_ipc_message):
        with contextlib.suppress(IpcFormatError):
            parse(data, abi)


@given(st.sampled_from(ABIS), st.data())
def test_any_union_bytes_decode_as_every_member_without_error(
    abi: Abi, data: st.DataObject
) -> None:
    size = ipc.ipc_message_size(abi) - 8
    union = data.draw(st.binary(min_size=size, max_size=size))
    order = "<" if abi.byteorder == "little" else ">"
    message = ipc.parse_ipc_message(struct.pack(f"{order}Ii", ipc.IPC_MAGIC, 1) + union, abi)
    message.install_request(), message.status(), message.notify(), message.text()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "an ipc_message is 3120 bytes"),
        (b"\x01\x20\x05\x14" + bytes(100), "got 104"),
        (bytes(3121), "got 3121"),
        (bytes(3120), "magic 0x00000000, expected 0x14052001"),
    ],
)
def test_malformed_ipc_messages_are_one_line_errors(data: bytes, message: str) -> None:
    with pytest.raises(IpcFormatError, match=message):
        ipc.parse_ipc_message(data, LP64)


def test_a_short_progress_record_is_a_one_line_error() -> None:
    with pytest.raises(IpcFormatError, match=r"a progress_msg is 2416 bytes .*got 2415"):
        ipc.parse_progress_msg(bytes(2415), LP64)


@pytest.mark.parametrize(
    ("member", "abi", "message"),
    [
        (InstallRequest(0, "x" * 512), LP64, "info is 512 bytes; at most 511 fit"),
        (InstallRequest(0, "a\0b"), LP64, "must not contain a NUL"),
        (InstallRequest(0, "\udcff"), LP64, "not encodable as UTF-8"),
        (InstallRequest(2**32), ILP32_EABI, "cannot build instmsg"),
        (InstallRequest(-1), LP64, "cannot build instmsg"),
        (Text("é" * 64), LP64, "msg is 128 bytes; at most 127 fit"),
    ],
)
def test_values_that_do_not_fit_the_c_layout_are_refused_when_building(
    member: ipc.Member, abi: Abi, message: str
) -> None:
    with pytest.raises(IpcFormatError, match=message):
        ipc.build_ipc_message(MsgType.REQ_INSTALL, member, abi)


def test_char_arrays_decode_to_the_first_nul_and_replace_bad_utf8() -> None:
    assert ipc.decode_chars(b"\0ayload.bin") == ""
    assert ipc.decode_chars(b"ok\0\xff\xfe") == "ok"
    assert ipc.decode_chars(b"caf\xc3") == "caf\ufffd"
    assert ipc.enum_name(RecoveryStatus, 3) == "SUCCESS"
    assert ipc.enum_name(RecoveryStatus, 99) == "99"


# --- The IPC installer against a fake daemon ---------------------------------------------------


def verified(image_format: str = "swu") -> VerifiedManifest:
    return make_release(IMAGE, KEY, sequence=4, image_format=image_format).verified()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return read_only_file(tmp_path / "update.swu", IMAGE)


SIZE = ipc.ipc_message_size()
RECORD = ipc.progress_msg_size()


def _recv(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


@dataclass
class Session:
    """One install as the fake daemon sees it; a scenario drives it."""

    control: socket.socket
    progress: socket.socket
    request: ipc.IpcMessage
    listener: socket.socket
    subscribe: bool
    notify: socket.socket | None = None
    image: bytearray = field(default_factory=bytearray)

    def reply(self, msgtype: int, text: str = "") -> None:
        self.control.sendall(ipc.build_ipc_message(msgtype, Text(text)))
        if msgtype == MsgType.ACK:
            # An accepted client subscribes to the notifications on a second connection.
            notify, _ = self.listener.accept()
            assert ipc.parse_ipc_message(_recv(notify, SIZE)).type == MsgType.NOTIFY_STREAM
            notify.sendall(ipc.build_ipc_message(MsgType.ACK if self.subscribe else MsgType.NACK))
            if self.subscribe:
                self.notify = notify
            else:
                notify.close()

    def report(self, status: int, info: str = "") -> None:
        self.progress.sendall(ipc.build_progress_msg(ProgressMsg(status, info=info)))

    def note(self, status: int, level: int, msg: str) -> None:
        assert self.notify is not None
        self.notify.sendall(
            ipc.build_ipc_message(MsgType.NOTIFY_STREAM, Notify(status, 0, level, msg))
        )

    def read_start(self) -> None:
        """Read the first bytes of the image: a daemon reports nothing before it has them."""
        self.image += _recv(self.control, 4096)

    def read_image(self) -> None:
        while chunk := self.control.recv(1 << 16):
            self.image += chunk

    def finish(self, status: int) -> None:
        """The verdict, then idle, as the daemon ends an install."""
        self.report(status)
        if self.notify is not None:
            self.note(RecoveryStatus.IDLE, 3, "Waiting for requests...")


Scenario = Callable[[Session], None]


class FakeDaemon:
    """Listens on DIR/sockinstctrl and DIR/swupdateprog like swupdate; runs one scenario per
    install request, in order."""

    def __init__(
        self, directory: Path, *scenarios: Scenario, notify: bool = True, stale: int = 0
    ) -> None:
        self.directory = directory
        self.scenarios = scenarios
        self.subscribe = notify
        self.stale = stale  # progress records written to a client before it asks anything
        self.errors: list[BaseException] = []
        self.sessions: list[Session] = []
        self.listeners = []
        for name in ("swupdateprog", "sockinstctrl"):
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(directory / name))
            listener.listen(4)
            listener.settimeout(10)
            self.listeners.append(listener)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        progress_listener, control_listener = self.listeners
        try:
            for scenario in self.scenarios:
                progress, _ = progress_listener.accept()
                for _ in range(self.stale):
                    progress.sendall(ipc.build_progress_msg(ProgressMsg(RecoveryStatus.FAILURE)))
                control, _ = control_listener.accept()
                message = ipc.parse_ipc_message(_recv(control, SIZE))
                session = Session(control, progress, message, control_listener, self.subscribe)
                self.sessions.append(session)
                scenario(session)
        except BaseException as exc:  # noqa: BLE001 - reported by the test through `errors`
            self.errors.append(exc)

    def close(self) -> None:
        self.thread.join(10)
        for listener in self.listeners:
            listener.close()
        for session in self.sessions:
            for sock in (session.control, session.progress, session.notify):
                if sock is not None:
                    sock.close()
        assert not self.errors, self.errors

    @property
    def session(self) -> Session:
        return self.sessions[-1]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., FakeDaemon]]:
    started: list[FakeDaemon] = []

    def start(*scenarios: Scenario, **kwargs: object) -> FakeDaemon:
        run = tmp_path / "run"
        run.mkdir()
        fake = FakeDaemon(run, *scenarios, **kwargs)  # type: ignore[arg-type]
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.close()


def _install(fake: FakeDaemon, image: Path, timeout: float = 10, start_timeout: float = 5.0) -> str:
    installer = get_installer(f"swupdate:{fake.directory}")
    assert isinstance(installer, SwupdateIpcInstaller)
    installer.timeout = timeout
    # Generous unless a test is about an install that never starts: on a loaded machine the
    # fake's START can take longer than a short limit, and a needless second request would
    # wait for a connection the scripted fake never accepts.
    installer.start_timeout = start_timeout
    installer.settle_timeout = 0.3
    return installer.install(image, verified()).status


def test_ipc_install_announces_the_image_streams_it_whole_and_reports_success(
    daemon: Callable[..., FakeDaemon], image: Path
) -> None:
    def scenario(s: Session) -> None:
        s.reply(MsgType.ACK)
        s.read_image()
        s.report(RecoveryStatus.START, "otacast demo-image 1.0.4")
        s.report(RecoveryStatus.PROGRESS)
        s.finish(RecoveryStatus.SUCCESS)

    fake = daemon(scenario)
    assert _install(fake, image) == "installed"
    assert fake.session.request.type == MsgType.REQ_INSTALL
    assert fake.session.request.install_request() == InstallRequest(
        length=len(IMAGE), info="otacast demo-image 1.0.4"
    )
    assert bytes(fake.session.image) == IMAGE == image.read_bytes()
    assert stat.S_IMODE(image.stat().st_mode) == 0o444


def test_progress_records_written_before_the_request_was_accepted_are_not_ours(
    daemon: Callable[..., FakeDaemon], image: Path
) -> None:
    # Two stale FAILURE records sit in the progress socket before the ACK; the verdict is ours.
    def scenario(s: Session) -> None:
        s.reply(MsgType.ACK)
        s.read_image()
        s.finish(RecoveryStatus.SUCCESS)

    assert _install(daemon(scenario, stale=2), image) == "installed"


def _accept_and_stall(s: Session) -> None:
    """swupdate 2022.12 after a lost wake-up: ACK, then nothing (module doc of the installer)."""
    s.reply(MsgType.ACK)


def test_an_accepted_install_that_never_starts_is_requested_again(
    daemon: Callable[..., FakeDaemon], image: Path
) -> None:
    def works(s: Session) -> None:
        s.reply(MsgType.ACK)
        s.note(RecoveryStatus.START, 3, "Software Update started !")
        s.read_image()
        s.finish(RecoveryStatus.SUCCESS)

    fake = daemon(_accept_and_stall, works)
    assert _install(fake, image, start_timeout=0.5) == "installed"
    assert len(fake.sessions) == 2
    assert bytes(fake.session.image) == IMAGE  # the image again, from its beginning


def test_an_install_that_never_starts_after_three_requests_is_a_clear_error(
    daemon: Callable[..., FakeDaemon], image: Path
) -> None:
    fake = daemon(_accept_and_stall, _accept_and_stall, _accept_and_stall)
    with pytest.raises(InstallError, match=r"accepted the install 3 times but never started it"):
        _install(fake, image, start_timeout=0.5)


@pytest.mark.parametrize("outcome", [RecoveryStatus.SUCCESS, RecoveryStatus.FAILURE])
def test_a_verdict_missed_on_the_progress_socket_is_taken_from_the_notifications(
    daemon: Callable[..., FakeDaemon], image: Path, outcome: RecoveryStatus
) -> None:
    # The daemon had not yet accepted the progress connection when it wrote every record.
    def scenario(s: Session) -> None:
        s.reply(MsgType.ACK)
        s.note(RecoveryStatus.START, 3, "Software Update started !")
        s.read_image()
        if outcome == RecoveryStatus.SUCCESS:
            s.note(outcome, 3, "SWUPDATE successful !")
        else:
            s.note(outcome, 1, "ERROR : SW not compatible with hardware")
        s.note(RecoveryStatus.IDLE, 3, "Waiting for requests...")

    fake = daemon(scenario)
    if outcome == RecoveryStatus.SUCCESS:
        assert _install(fake, image) == "installed"
    else:
        with pytest.raises(InstallError, match=r"FAILURE .*: SW not compatible with hardware$"):
            _install(fake, image)


def test_a_busy_daemon_nacks_and_the_error_says_so(
    daemon: Callable[..., FakeDaemon], image: Path
) -> None:
    fake = daemon(lambda s: s.reply(MsgType.NACK, "Installation in progress"))
    with pytest.raises(InstallerUnavailable, match=r"^swupdate is busy: Installation in progress$"):
        _install(fake, image)


def test_a_nack_without_text_is_a_refusal_with_the_likely_causes(
    daemon: Callable[..., FakeDaemon], image: Path
) -> None:
    with pytest.raises(InstallError, match=r"refused the install request .API version"):
        _install(daemon(lambda s: s.reply(MsgType.NACK)), image)


def test_failure_is_explained_by_this_installs_error_messages_not_older_ones(
    daemon: Callable[..., FakeDaemon], image: Path
) -> None:
    def scenario(s: Session) -> None:
        s.reply(MsgType.ACK)
        # The daemon first replays its cache (a daemon that keeps it: a previous install's error).
        s.note(RecoveryStatus.FAILURE, 1, "ERROR : an older install's problem")
        s.note(RecoveryStatus.IDLE, 3, "Waiting for requests...")
        s.read_start()
        s.note(RecoveryStatus.START, 3, "Software Update started !")
        s.note(RecoveryStatus.RUN, 5, "[trace] : noise")
        s.note(RecoveryStatus.FAILURE, 1, "ERROR : Authentication of all signatures failed")
        s.report(RecoveryStatus.RUN)
        s.report(RecoveryStatus.FAILURE, info='{"stale": "info"}')
        s.note(RecoveryStatus.FAILURE, 1, "Image invalid or corrupted. Not installing ...")
        s.note(RecoveryStatus.IDLE, 3, "Waiting for requests...")
        s.read_image()

    with pytest.raises(InstallError) as caught:
        _install(daemon(scenario), image)
    # A refused image is told apart from a daemon that could not be asked (47): it is 46.
    assert type(caught.value) is InstallError and caught.value.exit_code == 46
    assert str(caught.value) == (
        "swupdate reported FAILURE installing demo-image 1.0.4: Authentication of all "
        "signatures failed (then: Image invalid or corrupted. Not installing ...)"
    )


def test_failure_without_a_notification_stream_still_fails_clearly(
    daemon: Callable[..., FakeDaemon], image: Path
) -> None:
    def scenario(s: Session) -> None:
        s.reply(MsgType.ACK)
        s.read_start()
        s.control.close()  # stops reading part-way: the client sees EPIPE or ECONNRESET
        s.report(RecoveryStatus.FAILURE)

    with pytest.raises(InstallError, match=r"FAILURE installing demo-image 1.0.4: no reason given"):
        _install(daemon(scenario, notify=False), image)


def test_a_progress_socket_closed_before_a_result_is_a_clear_error(
    daemon: Callable[..., FakeDaemon], image: Path
) -> None:
    def scenario(s: Session) -> None:
        s.reply(MsgType.ACK)
        s.read_image()
        s.report(RecoveryStatus.RUN)
        s.progress.close()

    with pytest.raises(InstallError, match=r"closed its progress socket before .*last: RUN"):
        _install(daemon(scenario), image)


def test_a_daemon_that_never_reports_a_result_is_given_up_on(
    daemon: Callable[..., FakeDaemon], image: Path
) -> None:
    def scenario(s: Session) -> None:
        s.reply(MsgType.ACK)
        s.note(RecoveryStatus.START, 3, "Software Update started !")
        s.read_image()
        s.progress.recv(1)  # hold the connection until the client gives up

    with pytest.raises(InstallError, match=r"did not report SUCCESS or FAILURE within 0.5 s"):
        _install(daemon(scenario), image, timeout=0.5)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"\x01\x20\x05\x14" + bytes(50), "closed the control connection after 54 bytes"),
        (bytes(SIZE), "malformed reply: not an SWUpdate ipc_message"),
    ],
)
def test_a_reply_of_another_size_or_magic_is_a_clear_error(
    daemon: Callable[..., FakeDaemon], image: Path, reply: bytes, message: str
) -> None:
    def scenario(s: Session) -> None:
        s.control.sendall(reply)
        s.control.close()

    with pytest.raises(InstallError, match=message):
        _install(daemon(scenario), image)


@pytest.mark.parametrize("spec", ["swupdate:/nonexistent", "swupdate-run:-v"])
def test_a_release_that_is_not_a_swu_is_refused_before_swupdate_sees_it(
    spec: str, image: Path
) -> None:
    with pytest.raises(
        InstallError, match=r"swupdate installs .swu images; demo-image 1.0.4 is a 'raw'"
    ):
        get_installer(spec).install(image, verified("raw"))


def test_no_daemon_is_unavailable_not_refused_and_names_the_control_socket(
    tmp_path: Path, image: Path
) -> None:
    with pytest.raises(
        InstallerUnavailable, match=rf"not running: no control socket at {tmp_path}/sockinst"
    ):
        get_installer(f"swupdate:{tmp_path}").install(image, verified())


def test_sockets_left_by_a_dead_daemon_are_unavailable_not_a_hang(
    tmp_path: Path, image: Path
) -> None:
    for name in ("sockinstctrl", "swupdateprog"):
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(tmp_path / name))
        dead.close()  # the file stays, nobody listens: ECONNREFUSED
    with pytest.raises(
        InstallerUnavailable, match=r"not running: progress socket .* refuses connections"
    ):
        get_installer(f"swupdate:{tmp_path}").install(image, verified())


# --- Whose sockets: only root's (or the configured owner's) answers are believed ------------------

NOBODY = 65534


def _succeeds(s: Session) -> None:
    s.reply(MsgType.ACK)
    s.read_image()
    s.report(RecoveryStatus.START)
    s.finish(RecoveryStatus.SUCCESS)


@contextlib.contextmanager
def daemon_of_another_user(uid: int, *, chown_to: int | None = None) -> Iterator[Path]:
    """A fake daemon answering SUCCESS, run by a forked child as `uid` in a fresh directory
    (under /tmp, which `uid` can reach); `chown_to` then gives the socket files to that uid, so
    that only the listening process's credentials tell who serves them."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user")
    directory = Path(tempfile.mkdtemp(prefix="otacast-swu-"))
    directory.chmod(0o777)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become `uid`, listen, answer one install, exit
        code = 1
        try:
            os.close(ready_r)
            os.setgid(uid)
            os.setuid(uid)
            fake = FakeDaemon(directory, _succeeds)
            os.write(ready_w, b"1")
            fake.thread.join(15)
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1", "the other user's daemon did not start"
        if chown_to is not None:
            for name in ("sockinstctrl", "swupdateprog"):
                os.chown(directory / name, chown_to, chown_to)
        yield directory
    finally:
        os.close(ready_r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        shutil.rmtree(directory, ignore_errors=True)


def test_sockets_created_by_another_user_are_refused_before_any_request(
    daemon: Callable[..., FakeDaemon], image: Path
) -> None:
    fake = daemon()  # root's listeners, but the files say another user made them
    for name in ("sockinstctrl", "swupdateprog"):
        os.chown(fake.directory / name, NOBODY, NOBODY)
    with pytest.raises(
        InstallError,
        match=r"progress socket .*/swupdateprog belongs to nobody \(uid 65534\), not root "
        r"\(uid 0\): refusing to trust it",
    ):
        get_installer(f"swupdate:{fake.directory}").install(image, verified())


def test_a_daemon_run_by_another_user_answering_success_is_refused(image: Path) -> None:
    # The files are root's, so only SO_PEERCRED shows who listens on them.
    with (
        daemon_of_another_user(NOBODY, chown_to=0) as directory,
        pytest.raises(
            InstallError,
            match=r"progress socket .* is served by a process of nobody \(uid 65534\), not "
            r"root \(uid 0\): refusing to trust its answers",
        ) as caught,
    ):
        get_installer(f"swupdate:{directory}").install(image, verified())
    assert "\n" not in str(caught.value)


def test_a_daemon_run_by_the_configured_owner_is_trusted(image: Path) -> None:
    with daemon_of_another_user(NOBODY) as directory:
        installer = get_installer(f"swupdate:nobody@{directory}")
        assert isinstance(installer, SwupdateIpcInstaller)
        installer.settle_timeout = 0.3
        assert installer.install(image, verified()).status == "installed"


def test_an_unknown_configured_owner_is_a_clear_error() -> None:
    with pytest.raises(InstallError, match=r"no user 'no-such-user-13' on this system"):
        get_installer("swupdate:no-such-user-13@/tmp")


# --- The swupdate -i installer with a stand-in program ----------------------------------------


def test_run_starts_a_private_daemon_with_the_arguments_and_its_own_tmpdir(
    tmp_path: Path, image: Path
) -> None:
    seen = tmp_path / "seen"
    program = shell_script(tmp_path / "fake-swupdate", f'echo "$TMPDIR" "$@" > {seen}\nexit 1\n')
    installer = SwupdateRunInstaller("-v -k '/etc/a cert.pem' -H board:1.0", program=str(program))
    with pytest.raises(InstallError):
        installer.install(image, verified())
    tmpdir, arguments = seen.read_text().rstrip("\n").split(" ", 1)
    assert arguments == "-v -k /etc/a cert.pem -H board:1.0"  # no -i: the image goes over IPC
    assert Path(tmpdir).name.startswith("otacast-swupdate-")
    assert not Path(tmpdir).exists()  # removed with the daemon's sockets


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            "echo '[INFO ] : SWUPDATE started :  Software Update started !'\n"
            "echo '[ERROR] : SWUPDATE failed [0] ERROR : cannot open key /k.pem' >&2\n"
            "echo '[ERROR] : SWUPDATE failed [1] Crypto cannot be initialized' >&2\n"
            "exit 1\n",
            ": cannot open key /k.pem$",
        ),
        (
            "echo 'Error: SWUpdate is built for signed images, provide a public key file.' >&2\n"
            "exit 1\n",
            ": SWUpdate is built for signed images, provide a public key file.$",
        ),
        ("echo 'something odd' >&2\nexit 1\n", ": something odd$"),
        ("exit 7\n", ": exit status 7$"),
    ],
)
def test_a_private_daemon_that_exits_at_start_is_reported_with_its_first_error_line(
    tmp_path: Path, image: Path, body: str, reason: str
) -> None:
    program = shell_script(tmp_path / "fake-swupdate", body)
    with pytest.raises(InstallError, match=r"^\S*fake-swupdate -H b:1 exited" + reason):
        SwupdateRunInstaller("-H b:1", program=str(program)).install(image, verified())


def test_a_private_daemon_that_never_opens_its_sockets_is_stopped(
    tmp_path: Path, image: Path
) -> None:
    program = shell_script(tmp_path / "fake-swupdate", "exec sleep 30\n")
    installer = SwupdateRunInstaller("", program=str(program))
    installer.start_timeout = 0.5
    started = time.monotonic()
    with pytest.raises(InstallError, match=r"did not open its sockets within 0.5 s"):
        installer.install(image, verified())
    assert time.monotonic() - started < 10  # stopped, not waited for


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("swupdate-run:-i other.swu", "must not name the image"),
        ("swupdate-run:--image=x", "must not name the image"),
        ("swupdate-run:-k 'unclosed", "No closing quotation"),
    ],
)
def test_bad_swupdate_run_specs_are_one_line_errors(spec: str, message: str) -> None:
    with pytest.raises(InstallError, match=message):
        get_installer(spec)


def test_a_missing_swupdate_program_is_a_one_line_error(tmp_path: Path, image: Path) -> None:
    installer = SwupdateRunInstaller("", program=str(tmp_path / "no-such-swupdate"))
    with pytest.raises(InstallError, match=r"not found .is swupdate installed"):
        installer.install(image, verified())
