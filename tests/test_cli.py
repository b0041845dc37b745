"""The two console scripts, ``otacast-signer`` and ``otacast``, driven as subprocesses.

Every refusal is checked the way a user meets it: one non-empty line on stderr that starts with
the program's name, the exit code of the specific error class (imported, never hard-coded), no
traceback, and the working directory byte-for-byte as it was (no output, no temporary file).
Independent commands run concurrently to keep the file fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from otacast.plugin import errors as device_errors
from otacast.plugin.errors import UpToDate
from otacast.schemas import keyfile
from otacast.schemas.canonical import canonical_bytes
from otacast.schemas.errors import (
    BadSignature,
    BelowThreshold,
    Expired,
    ImageMismatch,
    KeyFormatError,
    MalformedDelta,
    MalformedIndex,
    MalformedManifest,
    ManifestTooLarge,
    OtacastError,
    Rollback,
    UnknownKey,
    WrongDevice,
)
from otacast.schemas.limits import MAX_MANIFEST_BYTES
from otacast.schemas.manifest import SIGNING_CONTEXT
from otacast.schemas.trustset import TrustSetRejected
from otacast.schemas.units import format_time
from otacast.signer import errors as signer_errors
from otacast.signer.keys import load_secret

from .helpers import untimed

SIGNER = "otacast-signer"
DEVICE = "otacast"

CHUNK = 55 * 1208  # about 64 KiB in whole 1208-byte symbols (RFC 6330 blocks)
IMAGE_BYTES = 300_000  # 249 symbols: RFC 6330 Partition[249, 5] = 4 chunks of 50, one of 49
# Chunk offsets (multiples of the 1208-byte symbol), the last chunk ends with the image.
CHUNK_OFFSETS = (0, 50 * 1208, 100 * 1208, 150 * 1208, 200 * 1208, IMAGE_BYTES)
CHUNKS = 5
SEQUENCE = 7
CHANNEL = "updates.example.com"
SIGN_ARGS: tuple[str, ...] = (
    "--sequence",
    str(SEQUENCE),
    "--device-type",
    "dev-a",
    "--device-type",
    "dev-b",
    "--channel",
    CHANNEL,
    "--chunk-size",
    "64K",
)


# --- Running the scripts -----------------------------------------------------------------------


def _script(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"console script {name!r} is not installed", pytrace=False)
    return found


# The scripts' environment: as inherited, except that bytecode is cached in a private directory
# (never next to the sources) so each of the many short runs does not recompile otacast.
_ENV: dict[str, str] = dict(os.environ)


@pytest.fixture(scope="module", autouse=True)
def _bytecode_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    _ENV.pop("PYTHONDONTWRITEBYTECODE", None)
    _ENV["PYTHONPYCACHEPREFIX"] = str(tmp_path_factory.mktemp("pycache"))


@dataclass(frozen=True)
class Result:
    prog: str
    args: tuple[str, ...]
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    def __str__(self) -> str:
        return (
            f"$ {self.prog} {' '.join(self.args)}\n"
            f"exit {self.code}\nstdout: {self.out!r}\nstderr: {self.err!r}"
        )


Command = Sequence[object]


def run_all(cwd: Path, *commands: Command, umask: int | None = None) -> list[Result]:
    """Run each ``(prog, *args)`` concurrently in `cwd`; results in the order given."""

    def set_umask() -> None:
        if umask is not None:
            os.umask(umask)

    started = []
    for prog, *args in commands:
        argv = [str(a) for a in args]
        proc = subprocess.Popen(
            [_script(str(prog)), *argv],
            cwd=cwd,
            env=_ENV,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=set_umask if umask is not None else None,
        )
        started.append((str(prog), tuple(argv), proc))
    results = []
    for prog, argv, proc in started:
        out, err = proc.communicate(timeout=60)
        results.append(
            Result(
                prog,
                argv,
                proc.returncode,
                out.decode("utf-8", "replace"),
                err.decode("utf-8", "replace"),
            )
        )
    return results


def run(cwd: Path, *command: object, umask: int | None = None) -> Result:
    return run_all(cwd, command, umask=umask)[0]


def assert_ok(result: Result) -> Result:
    assert "Traceback" not in result.out + result.err, result
    assert result.code == 0, result
    assert result.err_lines == [], result
    return result


def assert_refused(
    result: Result,
    error: type[OtacastError],
    *fragments: str,
    json_stdout: bool = False,
    stdout: str | None = "",
) -> str:
    """One line on stderr, starting with the program name, the class's exit code.

    Each fragment must appear in that line (ignoring case)."""
    assert "Traceback" not in result.out + result.err, result
    assert result.code != 0, result
    assert result.code == error.exit_code, (
        f"expected {error.__name__} (exit {error.exit_code})\n{result}"
    )
    lines = result.err_lines
    assert len(lines) == 1, result
    line = lines[0]
    assert line.startswith(f"{result.prog}: "), result
    for fragment in fragments:
        assert fragment.lower() in line.lower(), f"{fragment!r} not in the error line\n{result}"
    if json_stdout:
        report = json.loads(result.out)
        if result.prog == "otacast":  # every device JSON line has its time
            untimed(report)
        assert report["ok"] is False, result
        assert report["error"] == error.__name__, result
    elif stdout is not None:
        assert result.out == stdout, result
    return line


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every entry under `root` (hidden ones too) with its content hash and mode."""
    state: dict[str, tuple[str, int]] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            mode = stat.S_IMODE(path.lstat().st_mode)
            digest = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            state[path.relative_to(root).as_posix()] = (digest, mode)
    return state


Refusal = tuple[Command, type[OtacastError], Sequence[str]]


def refuse_each(cwd: Path, refusals: Sequence[Refusal], **expect: Any) -> list[Result]:
    """Run the commands concurrently; each must be refused with its error (and its message
    fragments), and `cwd` must be left exactly as it was.  `expect` goes to `assert_refused`."""
    before = snapshot(cwd)
    results = run_all(cwd, *(command for command, _, _ in refusals))
    for result, (_, error, fragments) in zip(results, refusals, strict=True):
        assert_refused(result, error, *fragments, **expect)
    assert snapshot(cwd) == before, "a refused command changed the directory"
    return results


def refuse(
    cwd: Path,
    commands: Sequence[Command],
    error: type[OtacastError],
    *fragments: str,
    json_stdout: bool = False,
    stdout: str | None = "",
) -> list[Result]:
    """`refuse_each` for commands that all fail the same way.

    `stdout` is what each may print on stdout (None: not checked here)."""
    return refuse_each(
        cwd,
        [(command, error, fragments) for command in commands],
        json_stdout=json_stdout,
        stdout=stdout,
    )


def both_verify(manifest: object, *args: object) -> list[Command]:
    """The publisher's and the device's verify of one manifest (their common flags only)."""
    return [
        (SIGNER, "verify", manifest, *args),
        (DEVICE, "verify", manifest, *args),
    ]


# --- A release, made once per module -----------------------------------------------------------


@dataclass(frozen=True)
class World:
    root: Path
    alice_id: str
    bob_id: str
    sign_stdout: str

    alice_key = "alice.key"
    alice_pub = "alice.pub"
    bob_key = "bob.key"
    bob_pub = "bob.pub"
    image = "img.bin"
    manifest = "img.bin.manifest.json"
    short_lived = "short-lived.json"  # signed with --expires 1s when the module starts

    def path(self, name: str) -> Path:
        return self.root / name

    def read_manifest(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.path(self.manifest).read_bytes())
        return document

    def copy_to(self, dest: Path) -> World:
        for name in (
            self.alice_key,
            self.alice_pub,
            self.bob_key,
            self.bob_pub,
            self.image,
            self.manifest,
            self.short_lived,
        ):
            shutil.copy2(self.path(name), dest / name)  # keeps the 0600 of the secret keys
        return World(dest, self.alice_id, self.bob_id, self.sign_stdout)


def _key_id_from_stdout(result: Result) -> str:
    ids = [line.split()[-1] for line in result.out.splitlines() if line.startswith("key id ")]
    assert len(ids) == 1, result
    return ids[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("release")
    image = random.Random(20240607).randbytes(IMAGE_BYTES)
    (root / World.image).write_bytes(image)
    alice, bob = run_all(root, (SIGNER, "keygen", "alice"), (SIGNER, "keygen", "bob"))
    assert_ok(alice)
    assert_ok(bob)
    sign = (SIGNER, "sign", World.image, "--key", World.alice_key, *SIGN_ARGS)
    signed, short_lived = run_all(
        root, sign, (*sign, "--expires", "1s", "--out", World.short_lived)
    )
    assert_ok(short_lived)
    assert_ok(signed)
    return World(root, _key_id_from_stdout(alice), _key_id_from_stdout(bob), signed.out)


@pytest.fixture
def work(world: World, tmp_path: Path) -> World:
    """A private copy of the release that a test may change."""
    return world.copy_to(tmp_path)


def edit_manifest(work: World, change: Callable[[dict[str, Any]], None]) -> None:
    document = work.read_manifest()
    change(document)
    work.path(work.manifest).write_text(json.dumps(document, indent=2), encoding="utf-8")


# --- The error vocabulary the tests rely on ----------------------------------------------------


def test_exit_codes_of_distinct_failures_are_distinct_and_non_zero() -> None:
    classes = [
        KeyFormatError,
        signer_errors.InsecureKeyFile,
        signer_errors.ReadError,
        signer_errors.WriteError,
        signer_errors.UsageError,
        ManifestTooLarge,
        MalformedManifest,
        UnknownKey,
        BadSignature,
        BelowThreshold,
        Expired,
        Rollback,
        WrongDevice,
        ImageMismatch,
        MalformedDelta,
        MalformedIndex,
        TrustSetRejected,
        signer_errors.NetworkError,
        signer_errors.MenderArtifactError,
        signer_errors.ServedManifestExpired,
    ]
    codes = [c.exit_code for c in classes]
    assert all(code not in (0, 1) for code in codes)
    assert len(set(codes)) == len(codes), {c.__name__: c.exit_code for c in classes}
    # The same failure has the same code on both sides.
    assert device_errors.UsageError.exit_code == signer_errors.UsageError.exit_code == 2
    assert device_errors.ReadError.exit_code == signer_errors.ReadError.exit_code


# --- keygen ------------------------------------------------------------------------------------


def test_keygen_writes_secret_key_mode_0600_and_public_key_and_prints_key_id(
    tmp_path: Path,
) -> None:
    # A permissive umask must not widen the secret key's mode.
    result = assert_ok(run(tmp_path, SIGNER, "keygen", "release", umask=0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release.key", "release.pub"]
    secret = tmp_path / "release.key"
    public = tmp_path / "release.pub"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644

    secret_fields = secret.read_text("ascii").split()
    public_fields = public.read_text("ascii").split()
    assert secret_fields[0] == "otacast-ed25519-secret"
    assert public_fields[0] == "otacast-ed25519-public"
    assert len(bytes.fromhex(secret_fields[1])) == 32
    raw_public = bytes.fromhex(public_fields[1])
    assert len(raw_public) == 32
    assert secret_fields[1] != public_fields[1]

    key_id = hashlib.sha256(raw_public).hexdigest()
    assert _key_id_from_stdout(result) == key_id
    assert f"keyid={key_id}" in public_fields
    assert "release.key" in result.out
    assert "release.pub" in result.out


def test_keygen_refuses_to_overwrite_without_force_and_leaves_old_files(tmp_path: Path) -> None:
    # "old" has both files; "half" only a public key (keygen must not add a secret key to it).
    for name in ("old.key", "old.pub", "half.pub"):
        (tmp_path / name).write_text(f"precious {name}\n", encoding="ascii")
        (tmp_path / name).chmod(0o600)
    refuse_each(
        tmp_path,
        [
            (
                (SIGNER, "keygen", "old"),
                signer_errors.WriteError,
                ("old.pub and old.key exist", "--force"),
            ),
            ((SIGNER, "keygen", "half"), signer_errors.WriteError, ("half.pub exists",)),
        ],
    )


def test_keygen_force_replaces_an_existing_pair(tmp_path: Path) -> None:
    first = assert_ok(run(tmp_path, SIGNER, "keygen", "k"))
    old_secret = (tmp_path / "k.key").read_bytes()
    second = assert_ok(run(tmp_path, SIGNER, "keygen", "k", "--force"))
    assert _key_id_from_stdout(second) != _key_id_from_stdout(first)
    assert (tmp_path / "k.key").read_bytes() != old_secret
    assert f"keyid={_key_id_from_stdout(second)}" in (tmp_path / "k.pub").read_text("ascii")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key", "k.pub"]


def test_keygen_force_that_fails_leaves_the_old_secret_key(work: World) -> None:
    work.path(work.alice_pub).unlink()
    work.path(work.alice_pub).mkdir()  # NAME.pub cannot be replaced
    refuse(
        work.root, [(SIGNER, "keygen", "alice", "--force")], signer_errors.WriteError, "alice.pub"
    )


# --- The happy path ----------------------------------------------------------------------------


def test_sign_writes_a_manifest_with_one_hash_per_chunk(world: World) -> None:
    image = world.path(world.image).read_bytes()
    signed = world.read_manifest()["signed"]
    assert f"{CHUNKS} chunk(s)" in world.sign_stdout
    assert f"sequence {SEQUENCE}" in world.sign_stdout
    assert f"expires {format_time(signed['expires'])}" in world.sign_stdout
    assert signed["sequence"] == SEQUENCE
    assert signed["compatible"] == ["dev-a", "dev-b"]
    assert signed["image"]["length"] == IMAGE_BYTES
    assert signed["image"]["sha256"] == hashlib.sha256(image).hexdigest()
    assert signed["chunks"]["size"] == CHUNK
    assert signed["chunks"]["sha256"] == [
        hashlib.sha256(image[a:b]).hexdigest() for a, b in itertools.pairwise(CHUNK_OFFSETS)
    ]
    assert len(signed["chunks"]["sha256"]) == CHUNKS
    assert signed["transport"]["channel"] == CHANNEL
    assert [s["keyid"] for s in world.read_manifest()["signatures"]] == [world.alice_id]
    # Nothing else appeared next to the image: no temporary files.
    names = [world.alice_key, world.alice_pub, world.bob_key, world.bob_pub, world.image]
    assert sorted(p.name for p in world.root.iterdir()) == sorted(
        [*names, world.manifest, world.short_lived]
    )


def test_verify_accepts_the_manifest_and_its_image(work: World) -> None:
    result = assert_ok(
        run(
            work.root,
            SIGNER,
            "verify",
            work.manifest,
            "--trust",
            work.alice_pub,
            "--image",
            work.image,
            "--device-type",
            "dev-b",
            "--installed-sequence",
            SEQUENCE - 1,
        )
    )
    manifest_ok, image_ok = result.out.splitlines()
    assert manifest_ok.startswith(f"OK: {work.image} version {SEQUENCE} sequence {SEQUENCE}")
    assert "signed by 1 of 1 trusted key(s) (threshold 1)" in manifest_ok
    expires = work.read_manifest()["signed"]["expires"]
    assert manifest_ok.endswith(f", expires {format_time(expires)}")
    assert image_ok == f"OK: {work.image} matches ({IMAGE_BYTES} bytes, {CHUNKS} chunk(s))"


def test_inspect_shows_the_manifest_for_people_and_as_json(work: World) -> None:
    human, machine = run_all(
        work.root,
        (SIGNER, "inspect", work.manifest),
        (SIGNER, "inspect", work.manifest, "--json"),
    )
    assert_ok(human)
    assert f"sequence {SEQUENCE}" in human.out
    assert "devices    dev-a, dev-b" in human.out
    signed = work.read_manifest()["signed"]
    valid = f"valid      {format_time(signed['created'])} .. {format_time(signed['expires'])}"
    assert valid in human.out
    assert f"chunks     {CHUNKS} x 64.9 KiB (at most; 1 FLUTE object(s)" in human.out
    assert f"signature  keyid {work.alice_id}" in human.out
    assert "signatures not checked" in human.out

    assert_ok(machine)
    info = json.loads(machine.out)
    image = work.path(work.image).read_bytes()
    assert info["sequence"] == SEQUENCE
    assert info["version"] == str(SEQUENCE)
    assert info["compatible"] == ["dev-a", "dev-b"]
    assert info["image"] == {
        "name": work.image,
        "length": IMAGE_BYTES,
        "sha256": hashlib.sha256(image).hexdigest(),
        "format": "raw",
    }
    assert info["chunks"] == {"count": CHUNKS, "size": CHUNK, "objects": 1}
    assert info["transport"]["channel"] == CHANNEL
    assert info["signatures"] == [work.alice_id]
    assert info["signatures_checked"] is False
    assert len(info["session_id"]) == 16
    assert info["session_id"] in work.sign_stdout


def test_device_verify_accepts_a_newer_release_for_its_type_as_text_and_json(
    work: World,
) -> None:
    device_args = (
        "--trust",
        work.alice_pub,
        "--device-type",
        "dev-a",
        "--installed-sequence",
        SEQUENCE - 1,
    )
    text, machine = run_all(
        work.root,
        (DEVICE, "verify", work.manifest, *device_args),
        (DEVICE, "verify", work.manifest, *device_args, "--json"),
    )
    expires = work.read_manifest()["signed"]["expires"]
    assert_ok(text)
    assert text.out.strip() == (
        f"OK: {work.image} version {SEQUENCE} sequence {SEQUENCE} (1 trusted signature(s)), "
        f"expires {format_time(expires)}"
    )
    assert_ok(machine)
    report = untimed(json.loads(machine.out))
    session_id = report.pop("session_id")
    assert f"session {session_id}" in work.sign_stdout
    assert report == {
        "ok": True,
        "name": work.image,
        "version": str(SEQUENCE),
        "sequence": SEQUENCE,
        "expires": expires,
        "expires_at": format_time(expires),
        "signers": [work.alice_id],
    }


def test_manifest_of_exactly_the_size_limit_is_accepted_by_both_sides(work: World) -> None:
    path = work.path(work.manifest)
    data = path.read_bytes()
    path.write_bytes(data + b" " * (MAX_MANIFEST_BYTES - len(data)))
    for result in run_all(work.root, *both_verify(work.manifest, "--trust", work.alice_pub)):
        assert_ok(result)


# --- Threshold signatures and co-signing -------------------------------------------------------


def test_one_signature_is_below_a_threshold_of_two_on_both_sides(work: World) -> None:
    refuse(
        work.root,
        both_verify(
            work.manifest, "--trust", work.alice_pub, "--trust", work.bob_pub, "--threshold", 2
        ),
        BelowThreshold,
        "1 valid signature(s)",
        "2 required",
    )


def test_cosign_adds_a_second_signature_that_meets_a_threshold_of_two(work: World) -> None:
    before = work.read_manifest()
    cosigned = assert_ok(
        run(work.root, SIGNER, "sign", "--cosign", work.manifest, "--key", work.bob_key)
    )
    assert "2 signature(s)" in cosigned.out
    after = work.read_manifest()
    assert after["signed"] == before["signed"]
    assert [s["keyid"] for s in after["signatures"]] == [work.alice_id, work.bob_id]
    assert not [p.name for p in work.root.iterdir() if p.name.startswith(".")]
    for result in run_all(
        work.root,
        *both_verify(
            work.manifest, "--trust", work.alice_pub, "--trust", work.bob_pub, "--threshold", 2
        ),
    ):
        assert_ok(result)


def test_cosigning_twice_with_the_same_key_adds_no_duplicate(work: World) -> None:
    command = (SIGNER, "sign", "--cosign", work.manifest, "--key", work.bob_key)
    assert_ok(run(work.root, *command))
    once = work.path(work.manifest).read_bytes()
    again = assert_ok(run(work.root, *command))
    assert "2 signature(s)" in again.out
    assert work.path(work.manifest).read_bytes() == once
    keyids = [s["keyid"] for s in work.read_manifest()["signatures"]]
    assert keyids == [work.alice_id, work.bob_id]


def test_a_repeated_signature_from_one_key_counts_once(work: World) -> None:
    edit_manifest(work, lambda doc: doc["signatures"].append(dict(doc["signatures"][0])))
    refuse(
        work.root,
        both_verify(
            work.manifest, "--trust", work.alice_pub, "--trust", work.bob_pub, "--threshold", 2
        ),
        BelowThreshold,
    )


# --- Key files ---------------------------------------------------------------------------------


def sign_with(key: str) -> Command:
    """`sign` to a fresh output, so that only the key can be what is wrong."""
    return (SIGNER, "sign", World.image, "--key", key, *SIGN_ARGS, "--out", "new.json")


def _key_users(work: World, secret: str, public: str) -> dict[str, Command]:
    return {
        "sign --key": sign_with(secret),
        "verify --trust": (SIGNER, "verify", work.manifest, "--trust", public),
        "device --trust": (DEVICE, "verify", work.manifest, "--trust", public),
    }


def test_key_file_of_the_wrong_kind_is_refused_as_wrong_kind(work: World) -> None:
    shutil.copy2(work.path(work.alice_pub), work.path("private-copy.pub"))
    work.path("private-copy.pub").chmod(0o600)  # so that only its kind is wrong
    secret_as_public = ("is a secret key", "otacast-ed25519-public")
    public_as_secret = ("is a public key", "otacast-ed25519-secret")
    refuse_each(
        work.root,
        [
            (
                (SIGNER, "verify", work.manifest, "--trust", work.alice_key),
                KeyFormatError,
                secret_as_public,
            ),
            (
                (DEVICE, "verify", work.manifest, "--trust", work.alice_key),
                KeyFormatError,
                secret_as_public,
            ),
            (
                sign_with("private-copy.pub"),
                KeyFormatError,
                public_as_secret,
            ),
        ],
    )


def test_public_key_from_keygen_given_as_key_is_refused_as_wrong_kind(work: World) -> None:
    assert stat.S_IMODE(work.path(work.alice_pub).stat().st_mode) == 0o644
    refuse(
        work.root,
        [sign_with(work.alice_pub)],
        KeyFormatError,
        "is a public key",
    )


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        pytest.param("{tag} " + "ab" * 31 + "\n", "key has 31 bytes", id="truncated-31-bytes"),
        pytest.param("{tag} " + "zz" * 32 + "\n", "not hexadecimal", id="non-hex"),
        pytest.param("", "not an otacast key file", id="empty"),
    ],
)
def test_damaged_key_file_is_refused_by_every_user(work: World, body: str, fragment: str) -> None:
    secret = work.path("damaged.key")
    public = work.path("damaged.pub")
    secret.write_bytes(body.format(tag="otacast-ed25519-secret").encode("utf-8"))
    public.write_bytes(body.format(tag="otacast-ed25519-public").encode("utf-8"))
    secret.chmod(0o600)  # the mode is fine: the content is what is wrong
    refuse(
        work.root,
        list(_key_users(work, secret.name, public.name).values()),
        KeyFormatError,
        fragment,
    )


def test_missing_key_file_is_a_read_error_for_every_user(work: World) -> None:
    users = _key_users(work, "absent.key", "absent.pub")
    missing = ("absent", "No such file or directory")
    refuse_each(
        work.root,
        [
            (users["sign --key"], signer_errors.ReadError, missing),
            (users["verify --trust"], signer_errors.ReadError, missing),
            (users["device --trust"], device_errors.ReadError, missing),
        ],
    )


def test_world_readable_secret_key_is_refused_with_reason(work: World) -> None:
    shutil.copy2(work.path(work.alice_key), work.path("group.key"))
    work.path(work.alice_key).chmod(0o644)
    work.path("group.key").chmod(0o640)
    refuse_each(
        work.root,
        [
            (
                sign_with(key),
                signer_errors.InsecureKeyFile,
                (
                    f"secret key {key} is accessible by other users (mode {mode:04o})",
                    "may have been copied",
                    f"Run: chmod 600 {key}",
                ),
            )
            for key, mode in ((work.alice_key, 0o644), ("group.key", 0o640))
        ],
    )


# --- Manifests that are not what was signed, or not a manifest at all -------------------------


# A change to the manifest file's bytes; it may sign with the keys in the given directory.
Damage = Callable[[bytes, Path], bytes]


def _json_edit(change: Callable[[dict[str, Any]], None]) -> Damage:
    """`change` to the JSON, signatures left as they were (a forgery)."""

    def mutate(data: bytes, _: Path) -> bytes:
        document = json.loads(data)
        change(document)
        return json.dumps(document, indent=2).encode("utf-8")

    return mutate


def _signed_edit(change: Callable[[dict[str, Any]], None], key: str = World.alice_key) -> Damage:
    """`change` to the JSON, then ``signed`` signed by `key` alone (as a careless publisher, or
    one with a stolen key, could): refused for its content, not its signature."""

    def mutate(data: bytes, keys: Path) -> bytes:
        document = json.loads(data)
        change(document)
        signer = load_secret(keys / key)
        message = SIGNING_CONTEXT + canonical_bytes(document["signed"])
        document["signatures"] = [{"keyid": signer.key_id, "sig": signer.sign(message).hex()}]
        return json.dumps(document, indent=2).encode("utf-8")

    return mutate


def _replace(old: bytes, new: bytes) -> Damage:
    def mutate(data: bytes, _: Path) -> bytes:
        assert data.count(old) == 1, old
        return data.replace(old, new)

    return mutate


def _flip_signature_bit(document: dict[str, Any]) -> None:
    sig = document["signatures"][0]["sig"]
    nibble = format(int(sig[40], 16) ^ 0x1, "x")
    document["signatures"][0]["sig"] = sig[:40] + nibble + sig[41:]


def _set(*path_and_value: Any) -> Callable[[dict[str, Any]], None]:
    *path, value = path_and_value

    def change(document: dict[str, Any]) -> None:
        target = document
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _delete(*path: str) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        target = document
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return change


def _surrogate(data: bytes, _: Path) -> bytes:
    document = json.loads(data)
    document["signed"]["http"] = ["https://mirror.example.com/\ud800"]
    return json.dumps(document).encode("ascii")  # \ud800 stays an escape: valid UTF-8 bytes


SEQ = f'"sequence": {SEQUENCE}'.encode()

MANIFEST_DAMAGE = [
    pytest.param(_json_edit(_flip_signature_bit), BadSignature, "", id="signature-bit-flipped"),
    pytest.param(_replace(SEQ, b'"sequence": 6'), BadSignature, "",  # '7' ^ 0x01
                 id="sequence-bit-flipped"),
    pytest.param(_signed_edit(lambda d: None, World.bob_key), UnknownKey, "untrusted keys",
                 id="signed-by-an-untrusted-key"),
    # Content a schema refuses is refused as forged unless it is signed: signatures first.
    pytest.param(_json_edit(_set("signed", "extra", 1)), BadSignature, "",
                 id="unknown-field-in-signed-forged"),
    pytest.param(_signed_edit(_set("signed", "extra", 1)), MalformedManifest, "extra",
                 id="unknown-field-in-signed"),
    pytest.param(_json_edit(_set("extra", 1)), MalformedManifest, "extra",
                 id="unknown-field-at-top-level"),
    pytest.param(_signed_edit(_delete("signed", "expires")), MalformedManifest, "expires",
                 id="missing-signed-field"),
    pytest.param(_signed_edit(_set("signed", "image", "length", 2**62)), MalformedManifest,
                 "length", id="huge-length"),
    pytest.param(_json_edit(_set("signed", "image", "length", 2**62)), BadSignature, "",
                 id="huge-length-forged"),
    pytest.param(_replace(SEQ, b'"sequence": ' + b"9" * 5000), MalformedManifest, "",
                 id="5000-digit-integer"),
    pytest.param(_signed_edit(_set("signed", "sequence", -SEQUENCE)), MalformedManifest,
                 "sequence", id="negative-sequence"),
    pytest.param(_replace(SEQ, SEQ + b".0"), MalformedManifest, "only integers are allowed",
                 id="float-sequence"),
    pytest.param(_replace(SEQ, b'"sequence": NaN'), MalformedManifest, "NaN", id="nan"),
    pytest.param(_replace(b'"version": "7"', b'"version": "7\xff"'), MalformedManifest,
                 "UTF-8", id="non-utf8-bytes"),
    pytest.param(lambda data, _: b"\xef\xbb\xbf" + data, MalformedManifest, "byte-order mark",
                 id="byte-order-mark"),
    pytest.param(_replace(SEQ + b",", SEQ + b",\n    " + SEQ + b","), MalformedManifest,
                 "duplicate JSON key 'sequence'", id="duplicate-key"),
    pytest.param(_surrogate, MalformedManifest, "surrogate", id="lone-surrogate"),
    pytest.param(lambda data, _: data + b" " * (MAX_MANIFEST_BYTES + 1 - len(data)),
                 ManifestTooLarge, "limit", id="one-byte-over-2MiB"),
    pytest.param(lambda data, _: b"this is not JSON\n", MalformedManifest, "not valid JSON",
                 id="not-json"),
    pytest.param(lambda data, _: b"[" * 100_000 + b"]" * 100_000, MalformedManifest, "nested",
                 id="deeply-nested"),
]  # fmt: skip


@pytest.mark.parametrize(("damage", "error", "fragment"), MANIFEST_DAMAGE)
def test_damaged_or_forged_manifest_gets_the_same_error_and_exit_code_from_both_sides(
    work: World, damage: Damage, error: type[OtacastError], fragment: str
) -> None:
    # Both commands run `policy.verify_envelope` (size, outline, signatures, then the schema):
    # oversize, not JSON, a bad signature, an unknown key, and schema-invalid content that is
    # correctly signed each get one error class, and so one exit code, on both sides.
    path = work.path(work.manifest)
    path.write_bytes(damage(path.read_bytes(), work.root))
    publisher, device = refuse(
        work.root, both_verify(work.manifest, "--trust", work.alice_pub), error, fragment
    )
    assert publisher.code == device.code == error.exit_code
    # Both sides give the same reason.
    assert publisher.err.removeprefix(f"{SIGNER}: ") == device.err.removeprefix(f"{DEVICE}: ")


def test_inspect_refuses_a_malformed_manifest_too(work: World) -> None:
    edit_manifest(work, _set("signed", "sequence", -1))
    refuse(work.root, [(SIGNER, "inspect", work.manifest, "--json")], MalformedManifest)


# --- Genuine manifests that must still be refused ----------------------------------------------


def test_unknown_key_is_refused_by_both_sides(work: World) -> None:
    refuse(
        work.root,
        both_verify(work.manifest, "--trust", work.bob_pub),
        UnknownKey,
        "untrusted keys",
        work.alice_id[:16],
    )


def test_rollback_to_the_installed_sequence_is_refused_by_both_sides(work: World) -> None:
    installed = ("--trust", work.alice_pub, "--installed-sequence", SEQUENCE)
    before = snapshot(work.root)
    publisher, device, device_json = run_all(
        work.root,
        *both_verify(work.manifest, *installed),
        (DEVICE, "verify", work.manifest, *installed, "--json"),
    )
    reason = f"sequence {SEQUENCE} is not above the installed {SEQUENCE}"
    assert_refused(publisher, Rollback, reason)
    assert_refused(device, Rollback, reason)
    # With --json the device also reports on stdout, and stderr is still the one line.
    assert_refused(device_json, Rollback, reason, json_stdout=True)
    assert json.loads(device_json.out)["message"] in device_json.err
    assert snapshot(work.root) == before


@pytest.mark.parametrize("command", ["fetch", "install"])
def test_fetch_and_install_of_the_installed_release_say_up_to_date_with_their_own_code(
    work: World, command: str
) -> None:
    # `verify` above calls it a rollback; a device asked to update to what it runs has nothing
    # to do, and says so with a code of its own (not 0, not a failure's).
    args = ("--trust", work.alice_pub, "--installed-sequence", SEQUENCE)
    args += ("--manifest", work.manifest, "--state-dir", "state", "--out", "out.img")
    if command == "install":
        args += ("--installer", "file:slot.img", "--device-type", "dev-a", "--channel", CHANNEL)
    plain, as_json = run_all(
        work.root, (DEVICE, command, *args), (DEVICE, command, *args, "--json")
    )
    expected = f"up to date: the --manifest release, sequence {SEQUENCE}, is installed"
    assert (plain.code, plain.out, plain.err) == (UpToDate.exit_code, expected + "\n", "")
    assert as_json.code == UpToDate.exit_code == 4, as_json.err
    line = untimed(json.loads(as_json.out))
    assert line == {"event": "up-to-date", "sequence": int(SEQUENCE), "message": expected}
    assert not (work.root / "out.img").exists() and not (work.root / "slot.img").exists()


def test_wrong_device_type_is_refused_by_both_sides(work: World) -> None:
    refuse(
        work.root,
        both_verify(work.manifest, "--trust", work.alice_pub, "--device-type", "dev-c"),
        WrongDevice,
        "'dev-c'",
        "dev-a, dev-b",
    )


def test_publisher_verify_refuses_a_manifest_from_its_expiry_on(work: World) -> None:
    expires = work.read_manifest()["signed"]["expires"]
    before = snapshot(work.root)
    just_before, at_expiry = run_all(
        work.root,
        (SIGNER, "verify", work.manifest, "--trust", work.alice_pub, "--at", expires - 1),
        (SIGNER, "verify", work.manifest, "--trust", work.alice_pub, "--at", expires),
    )
    assert_ok(just_before)
    # Both dates as people read them, not epoch seconds.
    assert_refused(
        at_expiry, Expired, f"expired at {format_time(expires)} (now {format_time(expires)})"
    )
    assert snapshot(work.root) == before


def test_short_lived_manifest_is_refused_as_expired_by_both_sides(work: World) -> None:
    expires = json.loads(work.path(work.short_lived).read_bytes())["signed"]["expires"]
    time.sleep(max(0.0, expires - time.time()) + 0.2)  # signed with --expires 1s
    refuse(
        work.root,
        both_verify(work.short_lived, "--trust", work.alice_pub),
        Expired,
        f"expired at {format_time(expires)}",
    )


# --- Images ------------------------------------------------------------------------------------


def assert_only_manifest_ok(result: Result) -> None:
    """`verify --image` reports the (genuine) manifest as OK, and never the image."""
    assert result.out.startswith("OK: "), result
    assert len(result.out.splitlines()) == 1, result
    assert "matches" not in result.out, result


def test_image_with_one_byte_changed_is_a_mismatch_naming_the_chunk(work: World) -> None:
    path = work.path(work.image)
    data = bytearray(path.read_bytes())
    data[2 * CHUNK + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    (result,) = refuse(
        work.root,
        [(SIGNER, "verify", work.manifest, "--trust", work.alice_pub, "--image", work.image)],
        ImageMismatch,
        f"image {work.image}: chunk 2 does not match",
        stdout=None,
    )
    assert_only_manifest_ok(result)


def test_image_of_the_wrong_length_or_missing_is_refused(work: World) -> None:
    data = work.path(work.image).read_bytes()
    work.path("short.bin").write_bytes(data[:-1])
    work.path("long.bin").write_bytes(data + b"\0")
    verify = (SIGNER, "verify", work.manifest, "--trust", work.alice_pub, "--image")
    results = refuse_each(
        work.root,
        [
            (
                (*verify, "short.bin"),
                ImageMismatch,
                (f"is {IMAGE_BYTES - 1} bytes, the manifest says {IMAGE_BYTES}",),
            ),
            (
                (*verify, "long.bin"),
                ImageMismatch,
                (f"is {IMAGE_BYTES + 1} bytes, the manifest says {IMAGE_BYTES}",),
            ),
            ((*verify, "gone.bin"), signer_errors.ReadError, ("cannot read image gone.bin",)),
        ],
        stdout=None,
    )
    for result in results:
        assert_only_manifest_ok(result)


# --- Outputs that already exist ----------------------------------------------------------------


def test_sign_refuses_an_existing_output_without_force_and_leaves_it(work: World) -> None:
    outputs = ("out.json", work.manifest, "copy.json")  # --out, the default, --cosign --out
    for name in outputs:
        work.path(name).write_text("do not touch\n", encoding="ascii")
    sign = (SIGNER, "sign", work.image, "--key", work.alice_key, *SIGN_ARGS)
    explicit = (*sign, "--out", "out.json")
    cosign = (
        SIGNER,
        "sign",
        "--cosign",
        work.short_lived,
        "--key",
        work.bob_key,
        "--out",
        "copy.json",
    )
    refuse_each(
        work.root,
        [
            (explicit, signer_errors.WriteError, ("out.json exists", "--force")),
            (sign, signer_errors.WriteError, (f"{work.manifest} exists", "--force")),
            (cosign, signer_errors.WriteError, ("copy.json exists", "--force")),
        ],
    )

    for result in run_all(work.root, (*explicit, "--force"), (*sign, "--force")):
        assert_ok(result)
    for name in outputs[:2]:
        assert json.loads(work.path(name).read_bytes())["signed"]["sequence"] == SEQUENCE


# --- Bad arguments -----------------------------------------------------------------------------

# A fresh --out, so that no sign case stops at "output exists" before reaching its argument.
WITH_IMAGE = ("sign", World.image, "--key", World.alice_key, "--out", "new.json")
SIGN_NO_CHANNEL = SIGN_ARGS[: SIGN_ARGS.index("--channel")] + SIGN_ARGS[-2:]

BAD_ARGUMENTS = [
    pytest.param(SIGNER, ("sign", World.image, "--key", World.alice_key, *SIGN_ARGS,
                          "--no-such-option"),
                 "unrecognized arguments: --no-such-option", id="signer-unknown-option"),
    pytest.param(DEVICE, ("verify", World.manifest, "--trust", World.alice_pub, "--bogus"),
                 "--bogus", id="device-unknown-option"),
    pytest.param(SIGNER, (*WITH_IMAGE, *SIGN_ARGS, "--rate", "garbage"),
                 "invalid rate 'garbage'", id="rate-garbage"),
    pytest.param(SIGNER, (*WITH_IMAGE, *SIGN_NO_CHANNEL, "--channel", "bad..name"),
                 "not a valid DNS name", id="channel-bad..name"),
    pytest.param(SIGNER, (*WITH_IMAGE, "--device-type", "dev-a", "--channel", CHANNEL),
                 "--sequence", id="sign-without-sequence"),
    pytest.param(SIGNER, (*WITH_IMAGE, *SIGN_ARGS, "--cosign", World.manifest), "not both",
                 id="image-and-cosign"),
    pytest.param(DEVICE, ("verify", World.manifest, "--trust", World.alice_pub,
                          "--threshold", "0"), "threshold 0", id="device-threshold-zero"),
    pytest.param(SIGNER, (*WITH_IMAGE, *SIGN_ARGS, "--chunk-size", "1K"), "chunk",
                 id="chunk-size-1K-below-minimum"),
    pytest.param(SIGNER, (*WITH_IMAGE, *SIGN_ARGS, "--chunk-size", "16M"), "chunk",
                 id="chunk-size-16M-above-maximum"),
    pytest.param(SIGNER, (*WITH_IMAGE, *SIGN_ARGS, "--port", "70000"), "70000", id="port-70000"),
    pytest.param(SIGNER, (*WITH_IMAGE, *SIGN_ARGS, "--expires", "0"), "expires", id="expires-0"),
    pytest.param(SIGNER, (*WITH_IMAGE, *SIGN_ARGS, "--symbol-size", "1213"), "1213",
                 id="symbol-size-1213-not-aligned"),
    pytest.param(SIGNER, (*WITH_IMAGE, *SIGN_ARGS, "--rate", "1"), "at least 1K",
                 id="rate-channel-below-1K"),
    pytest.param(SIGNER, (*WITH_IMAGE, *SIGN_ARGS, "--name", "a/b"),
                 "do not make a valid manifest", id="name-with-slash"),
]  # fmt: skip


@pytest.mark.parametrize(("prog", "args", "fragment"), BAD_ARGUMENTS)
def test_bad_arguments_are_a_one_line_usage_error(
    work: World, prog: str, args: tuple[str, ...], fragment: str
) -> None:
    usage = signer_errors.UsageError if prog == SIGNER else device_errors.UsageError
    refuse(work.root, [(prog, *args)], usage, fragment)


# --- Packet authentication: stream keys ----------------------------------------------------------


def test_sign_lists_stream_keys_in_order_and_serve_refuses_a_key_the_manifest_does_not_list(
    work: World,
) -> None:
    # bob's key stands in for a sender's stream key; alice's is not listed as one.
    signed = run(
        work.root,
        SIGNER,
        "sign",
        work.image,
        "--key",
        work.alice_key,
        *SIGN_ARGS,
        "--stream-key",
        work.bob_pub,
        "--stream-key",
        work.alice_pub,
        "--force",
    )
    assert_ok(signed)
    listed = work.read_manifest()["signed"]["stream_keys"]
    publics = [
        keyfile.parse_public(work.path(name).read_bytes(), name).hex()
        for name in (work.bob_pub, work.alice_pub)
    ]
    assert listed == [{"sender": 0, "public": publics[0]}, {"sender": 1, "public": publics[1]}]
    resigned = run(
        work.root,
        SIGNER,
        "sign",
        work.image,
        "--key",
        work.alice_key,
        *SIGN_ARGS,
        "--stream-key",
        work.bob_pub,
        "--force",
    )
    assert_ok(resigned)
    refused = run(
        work.root,
        SIGNER,
        "serve",
        work.manifest,
        work.image,
        "--interface",
        "lo",
        "--cache-dir",
        "cache",
        "--stream-key",
        work.alice_key,
    )
    assert_refused(refused, signer_errors.UsageError, "is not one the manifest lists", stdout=None)


def test_serve_warns_that_rate_has_no_effect_and_refuses_a_missing_interface_before_encoding(
    work: World,
) -> None:
    served = run(
        work.root,
        SIGNER,
        "serve",
        work.manifest,
        work.image,
        "--interface",
        "otacast-none0",  # (no such interface: refused before any hashing or encoding)
        "--cache-dir",
        "cache",
        "--rate",
        "2M",
        "--channel-rate",
        "1M",
    )
    assert served.err_lines[0] == (
        "otacast-signer: warning: --rate has no effect: --channel-rate set the rates"
    )
    rest = "\n".join(served.err_lines[1:])
    assert_refused(
        dataclasses.replace(served, err=rest),
        signer_errors.NetworkError,
        "otacast-none0",
        stdout=None,
    )
    cache = work.root / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []
