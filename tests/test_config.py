"""The device config file: precedence, paths, and refusal of anything unexpected."""

from __future__ import annotations

from pathlib import Path

import pytest

from otacast.plugin.config import (
    DEFAULT_STATE_DIR,
    MAX_CONFIG_BYTES,
    DeviceConfig,
    load_config,
    settle,
)
from otacast.plugin.errors import ConfigError, ReadError

GOOD = """
trust = ["keys/release.pub", "/etc/otacast/backup.pub"]
threshold = 2
device_type = "testboard"
state_dir = "state"
interface = "eth0"
channel = "updates.example.test"
fallback = "never"
join_timeout = 5
stall_timeout = 2.5
installer = "file:/data/app.img"
source = ["fd51::1"]
"""


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "otacast.toml"
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    return path


def test_paths_in_the_config_are_relative_to_its_directory(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.trust == (tmp_path / "keys/release.pub", Path("/etc/otacast/backup.pub"))
    assert config.state_dir == tmp_path / "state"
    assert config.join_timeout == 5.0 and isinstance(config.join_timeout, float)
    assert config.source == ("fd51::1",)


def test_command_line_wins_over_the_file_and_the_file_over_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    settings = settle(config, {"channel": "other.example.test", "fallback": None, "source": None})
    assert settings.channel == "other.example.test"
    assert settings.fallback == "never"  # from the file
    assert settings.scope == "global"  # built-in default
    assert settings.out_path == tmp_path / "state" / "received.img"
    bare = settle(DeviceConfig(), {"trust": [Path("a.pub")], "source": []})
    assert bare.state_dir == DEFAULT_STATE_DIR and bare.trust == (Path("a.pub"),)
    assert bare.source == ()


def test_keep_staged_is_off_unless_the_file_or_the_command_line_sets_it(tmp_path: Path) -> None:
    trust = {"trust": [Path("a.pub")]}
    assert not settle(DeviceConfig(), {**trust, "keep_staged": None}).keep_staged
    assert settle(DeviceConfig(), {**trust, "keep_staged": True}).keep_staged
    kept = load_config(write(tmp_path, GOOD + "keep_staged = true\n"))
    assert settle(kept, {"keep_staged": None}).keep_staged


def test_no_trusted_key_anywhere_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no trusted keys"):
        settle(DeviceConfig(), {"trust": None})


def test_missing_default_config_is_fine_but_a_named_one_must_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTACAST_CONFIG", raising=False)
    with pytest.raises(ReadError, match="does not exist"):
        load_config(tmp_path / "absent.toml")
    monkeypatch.setenv("OTACAST_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(ReadError, match="does not exist"):
        load_config(None)


def test_environment_names_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTACAST_CONFIG", str(write(tmp_path, 'channel = "x.example.test"\n')))
    assert load_config(None).channel == "x.example.test"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('chanel = "typo.example.test"\n', "unknown setting 'chanel'"),
        ("threshold = 0\n", "threshold must be"),
        ("threshold = true\n", "threshold must be"),
        ('threshold = "2"\n', "threshold must be"),
        ("trust = []\n", "trust must be"),
        ('trust = "one.pub"\n', "trust must be"),
        ("port = 70000\n", "port must be"),
        ('fallback = "sometimes"\n', "fallback must be"),
        ('scope = "galactic"\n', "scope must be"),
        ("join_timeout = -1\n", "join_timeout must be"),
        ('keep_staged = "yes"\n', "keep_staged must be true or false"),
        ('installer = ""\n', "installer must be"),
        ('device_type = "a\\nb"\n', "device_type must be"),
        ("[channel]\nname = 1\n", "channel must be"),
        ("channel = \n", "otacast.toml"),  # TOML syntax error
    ],
)
def test_bad_settings_are_refused_with_one_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(write(tmp_path, text))
    assert "\n" not in str(caught.value)


def test_non_utf8_and_oversized_configs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(write(tmp_path, b'channel = "\xff"\n'))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(write(tmp_path, "#" * (MAX_CONFIG_BYTES + 1)))


def test_unreadable_config_is_a_read_error(tmp_path: Path) -> None:
    with pytest.raises(ReadError, match="cannot read config"):
        load_config(tmp_path)  # a directory


CONTRIB = Path(__file__).resolve().parent.parent / "contrib"


def test_the_shipped_example_config_is_valid(tmp_path: Path) -> None:
    config = load_config(CONTRIB / "otacast.toml")
    assert config.trust == (CONTRIB / "release.pub",)
    assert config.installer == "file:/data/app.img" and config.fallback == "auto"


def test_the_shipped_systemd_units_run_commands_that_parse() -> None:
    from otacast.plugin.cli import build_parser as device_parser
    from otacast.signer.cli import build_parser as signer_parser

    watch = (CONTRIB / "systemd/otacast-watch.service").read_text()
    line = next(x for x in watch.splitlines() if x.startswith("ExecStart="))
    program, *args = line.removeprefix("ExecStart=").split()
    assert program == "/usr/bin/otacast"
    assert device_parser().parse_args(args).command == "watch"
    serve = (CONTRIB / "systemd/otacast-serve@.service").read_text()
    line = next(x for x in serve.splitlines() if x.startswith("ExecStart="))
    program, *args = line.removeprefix("ExecStart=").split()
    assert program == "/usr/bin/otacast-signer"
    example = {"$MANIFEST": "a.json", "$IMAGE": "a.img", "$OPTIONS": "--interface=eth0"}
    parsed = signer_parser().parse_args([example.get(a, a).replace("%i", "x") for a in args])
    assert parsed.command == "serve"


def test_device_commands_name_what_the_config_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from otacast.plugin.cli import main

    monkeypatch.delenv("OTACAST_CONFIG", raising=False)
    config = write(tmp_path, 'channel = "updates.example.test"\n')
    assert main(["fetch", "--config", str(config)]) == ConfigError.exit_code
    assert "no trusted keys" in capsys.readouterr().err
    key = tmp_path / "release.pub"
    key.write_text("not used before the installer is checked\n")
    config.write_text(f'trust = ["{key}"]\nchannel = "updates.example.test"\n')
    for command in ("install", "watch"):
        assert main([command, "--config", str(config)]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and f"{command}: no device type: set device_type" in error
    config.write_text(
        f'trust = ["{key}"]\nchannel = "updates.example.test"\ndevice_type = "testboard"\n'
    )
    for command in ("install", "watch"):
        assert main([command, "--config", str(config)]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "no installer" in error
    # A device that installs must name its channel (it installs only releases signed for it).
    out = tmp_path / "image"
    config.write_text(f'trust = ["{key}"]\nout = "{out}"\ndevice_type = "testboard"\n')
    for command in ("install", "watch"):
        args = [command, "--config", str(config), "--installer", "file:" + str(tmp_path / "t")]
        assert main([*args, "--group", "ff3e::1234"]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "give --channel" in error, error
    bad = write(tmp_path, "threshold = 0\n")
    assert main(["status", "--config", str(bad)]) == ConfigError.exit_code
    assert "threshold must be" in capsys.readouterr().err
