"""Configuration from environment variables, and the one list of services."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from kvstack import runtime
from kvstack.backend import BackendConfig
from kvstack.ops import catalog
from kvstack.runtime import ConfigError, RuntimeConfig, load, parse_size, settings_of
from kvstack.server import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [RuntimeConfig, BackendConfig, ServerConfig]


def test_defaults_apply_when_unset() -> None:
    """With no variables set, every setting takes its documented default."""
    config = load(BackendConfig, {})
    assert config.map_size == 1 << 30
    assert config.data_dir == "/data"


def test_variables_override_defaults() -> None:
    """Each type is parsed from text: sizes with units, numbers, strings."""
    config = load(
        BackendConfig,
        {"KVSTACK_MAP_SIZE": "64MiB", "KVSTACK_DATA_DIR": "/x", "KVSTACK_GROUP_COMMIT_MAX": "1"},
    )
    assert (config.map_size, config.data_dir, config.group_commit_max) == (64 << 20, "/x", 1)
    assert load(RuntimeConfig, {"KVSTACK_SHUTDOWN_GRACE": "2.5"}).shutdown_grace == 2.5


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("100", 100),
        ("1KiB", 1024),
        ("64MiB", 64 << 20),
        ("1GiB", 1 << 30),
        ("2 mib", 2 << 20),
        ("3g", 3 << 30),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    """Sizes are bytes, or use binary units."""
    assert parse_size(text) == size


def test_invalid_value_names_the_variable() -> None:
    """A value that cannot be parsed is refused with the variable's name in the message."""
    with pytest.raises(ConfigError, match="KVSTACK_MAP_SIZE='lots'"):
        load(BackendConfig, {"KVSTACK_MAP_SIZE": "lots"})
    with pytest.raises(ConfigError, match="KVSTACK_METRICS_PORT"):
        load(RuntimeConfig, {"KVSTACK_METRICS_PORT": "nine"})


def test_every_setting_is_documented() -> None:
    """docs/configuration.md lists every variable with its default: the docs cannot drift."""
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for cls in CONFIGS:
        for env, _default, _help in settings_of(cls):
            assert re.search(rf"`{env}`", doc), f"{env} is missing from docs/configuration.md"


def test_the_service_list_has_the_three_services() -> None:
    """The one list has the backend, server and client with distinct ports."""
    services = catalog.services()
    assert {"backend", "server", "client"} <= set(services)
    ports = [s.port for s in services.values() if s.long_running]
    assert len(ports) == len(set(ports))
    assert catalog.get("server").calls == ("backend",)


@pytest.mark.parametrize(
    ("text", "ports", "message"),
    [
        ('[services.x]\nkind = "daemon"', {"x": 1}, "kind"),
        ('[services.x]\nkind = "stateless"', {}, "has no port: add it to kvstack.defaults.PORTS"),
        ('[services.x]\nkind = "stateless"\nport = 1', {"x": 1}, "set it in kvstack.defaults"),
        ('[services.x]\nkind = "job"', {"x": 1}, "a job, which serves no port"),
        ('[services.x]\nkind = "job"', {"y": 2}, "lists no service 'y'"),
        ('[services.x]\nkind = "job"\ncalls = ["nobody"]', {}, "unknown service"),
        ('[services.x]\nkind = "stateless"\nreplicas = 1', {"x": 1}, "runs 2 to 5"),
        ('[services.x]\nkind = "stateless"\nreplicas = 6', {"x": 1}, "runs 2 to 5"),
        ('[services.x]\nkind = "job"\n[services.y]\nkind = "job"\ncalls = ["x"]', {}, "a job"),
    ],
)
def test_service_list_errors_say_what_to_fix(
    text: str, ports: dict[str, int], message: str
) -> None:
    """A wrong entry in services.toml, or a port in kvstack.defaults.PORTS that disagrees with
    it, is refused with what is wrong and where to fix it."""
    with pytest.raises(ValueError, match=message):
        catalog.parse(text, ports=ports)


def test_the_tree_and_the_imported_modules_give_the_same_list() -> None:
    """catalog.of_tree reads the checkout's two files as text (what `kvstack manifests` and
    new-service use); it finds what the imported modules say."""
    assert catalog.of_tree(ROOT) == catalog.services()


def test_unknown_service_lists_the_known_ones() -> None:
    """Asking for a service that does not exist names the ones that do."""
    with pytest.raises(KeyError, match="known services: backend"):
        catalog.get("nope")


def test_json_log_lines_carry_fields(capsys: pytest.CaptureFixture[str]) -> None:
    """Logs are one JSON object per line with the service name and the structured fields."""
    import json
    import logging

    runtime.configure_logging("unit", "INFO")
    logging.getLogger("t").info("saved", extra=runtime.fields(key="k", bytes=3))
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["service"] == "unit"
    assert (line["message"], line["key"], line["bytes"]) == ("saved", "k", 3)
    logging.getLogger().handlers.clear()


@pytest.mark.parametrize(
    ("level", "severity"),
    [
        (logging.DEBUG, "DEBUG"),
        (logging.INFO, "INFO"),
        (logging.WARNING, "WARNING"),
        (logging.ERROR, "ERROR"),
        (logging.CRITICAL, "CRITICAL"),
        (logging.INFO + 5, "INFO"),  # a custom level rounds down to the nearest name
    ],
)
def test_json_log_lines_are_what_cloud_logging_reads(level: int, severity: str) -> None:
    """Every line carries Cloud Logging's special keys: `severity` (a LogSeverity name),
    `message`, and `time` in RFC 3339 with a UTC offset, at the record's own instant; the
    old `level`/`msg`/`ts` keys are gone, and a field named like a reserved key is kept under
    another name instead of replacing it."""
    import datetime
    import json

    record = logging.LogRecord("kvstack.t", level, __file__, 1, "took %d ms", (7,), None)
    record.created = 1796157000.25  # 2026-12-01T20:30:00.250Z
    record.fields = {"key": "k", "message": "from a field"}
    line = json.loads(runtime.JsonFormatter("unit").format(record))
    assert line["severity"] == severity
    assert line["message"] == "took 7 ms"
    assert line["time"] == "2026-12-01T20:30:00.250+00:00"
    parsed = datetime.datetime.fromisoformat(line["time"])
    assert parsed.utcoffset() == datetime.timedelta(0)
    assert parsed.timestamp() == record.created
    assert (line["service"], line["logger"], line["key"]) == ("unit", "kvstack.t", "k")
    assert line["field_message"] == "from a field"
    assert not {"level", "msg", "ts"} & set(line)


def test_services_refuse_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    """A long-running service given arguments exits 2 pointing at the environment variables,
    without building or starting anything."""

    def build() -> runtime.ServiceImpl:
        raise AssertionError("must not be built")

    assert runtime.run("backend", ["--port", "1"], build) == 2
    assert "KVSTACK_*" in capsys.readouterr().err


@pytest.mark.parametrize("service", ["backend", "server"])
def test_a_service_lists_its_settings_on_help(
    service: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m kvstack SERVICE --help` exits 0 and lists every setting it reads, its own and
    the shared runtime's, with defaults (the same names docs/configuration.md documents)."""
    from kvstack.__main__ import main

    assert main([service, "--help"]) == 0
    out = capsys.readouterr().out
    own = BackendConfig if service == "backend" else ServerConfig
    for env, _, _ in settings_of(RuntimeConfig) + settings_of(own):
        assert env in out
