"""Config: validated once, frozen, picklable and JSON-able (pure table tests)."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from typing import Any

import pytest

from trioserve import Config
from trioserve.errors import ConfigError


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param(
            {"port": 70000}, "port must be between 0 and 65535, got 70000", id="port-high"
        ),
        pytest.param({"port": -1}, "port must be between 0 and 65535, got -1", id="port-negative"),
        pytest.param({"port": "80"}, "port must be an integer, got '80'", id="port-str"),
        pytest.param({"port": True}, "port must be an integer, got True", id="port-bool"),
        pytest.param({"backlog": 0}, "backlog must be between 1 and", id="backlog-zero"),
        pytest.param({"workers": 0}, "workers must be between 1 and 4096, got 0", id="workers"),
        pytest.param({"fd": -1}, "fd must be a non-negative file descriptor, got -1", id="fd"),
        pytest.param(
            {"uds": "/tmp/x.sock", "fd": 3},
            "--uds and --fd are mutually exclusive",
            id="uds-and-fd",
        ),
        pytest.param(
            {"log_config": 5},
            "log_config must be a file path or a logging.config.dictConfig dict, got 5",
            id="log-config-int",
        ),
        pytest.param(
            {"timeout_keep_alive": 0}, "timeout_keep_alive must be > 0, got 0", id="keep-alive-zero"
        ),
        pytest.param(
            {"timeout_keep_alive": math.nan},
            "timeout_keep_alive must be > 0, got nan",
            id="keep-alive-nan",
        ),
        pytest.param(
            {"timeout_request_header": "5"},
            "timeout_request_header must be a number",
            id="header-timeout-str",
        ),
        pytest.param(
            {"timeout_graceful_shutdown": -1},
            "timeout_graceful_shutdown must be >= 0",
            id="graceful-negative",
        ),
        pytest.param(
            {"limit_concurrency": 0},
            "limit_concurrency must be between 1 and",
            id="limit-concurrency-zero",
        ),
        pytest.param(
            {"limit_max_requests": 0},
            "limit_max_requests must be between 1 and",
            id="limit-max-requests-zero",
        ),
        pytest.param(
            {"h11_max_incomplete_event_size": 10},
            "h11_max_incomplete_event_size must be between 1024 and",
            id="head-size",
        ),
        pytest.param(
            {"limit_request_body": -1},
            "limit_request_body must be between 0 and",
            id="limit-request-body-negative",
        ),
        pytest.param(
            {"timeout_request_body": -1.0},
            "timeout_request_body must be >= 0, got -1.0",
            id="timeout-request-body-negative",
        ),
        pytest.param(
            {"lifespan": "maybe"},
            "lifespan must be one of auto, on, off; got 'maybe'",
            id="lifespan",
        ),
        pytest.param(
            {"log_level": "loud"},
            "log_level must be one of critical, error, warning",
            id="log-level",
        ),
        pytest.param(
            {"root_path": "api"}, "root_path must start with '/', got 'api'", id="root-path"
        ),
        pytest.param({"host": ""}, "host must not be empty", id="host-empty"),
        pytest.param({"host": 127}, "host must be a string, got 127", id="host-int"),
        pytest.param(
            {"access_log": "no"}, "access_log must be True or False, got 'no'", id="bool-str"
        ),
        pytest.param({"app_dir": None}, "app_dir must be a string, got None", id="app-dir-none"),
        pytest.param(
            {"headers": ("nocolon",)},
            "header must be NAME:VALUE, got 'nocolon'",
            id="header-no-colon",
        ),
        pytest.param(
            {"headers": ("bad name:1",)},
            "header name must be a token, got 'bad name'",
            id="header-bad-name",
        ),
        pytest.param(
            {"headers": (("x-a", "1\r\nx-b: 2"),)},
            "header value must not contain CR, LF or NUL",
            id="header-injection",
        ),
    ],
)
def test_invalid_option_raises_config_error_naming_field_and_value(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Config(**options)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)  # ConfigError is also a ValueError


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"port": 0}, id="port-zero"),
        pytest.param({"port": 65535}, id="port-max"),
        pytest.param({"host": "::1"}, id="ipv6"),
        pytest.param({"host": "[::1]"}, id="ipv6-brackets"),
        pytest.param({"uds": "/tmp/x.sock"}, id="uds"),
        pytest.param({"fd": 0}, id="fd-zero"),
        pytest.param({"timeout_graceful_shutdown": 0}, id="graceful-zero"),
        pytest.param({"timeout_keep_alive": 1}, id="int-seconds"),
        pytest.param({"limit_request_body": 0, "timeout_request_body": 0}, id="body-limits-off"),
        pytest.param({"lifespan": "on", "log_level": "trace"}, id="choices"),
        pytest.param({"headers": ("X-A: 1", ("X-B", "two words"))}, id="headers"),
        pytest.param({"workers": 4}, id="workers"),
        # uvicorn warns and runs one reloading process; so does the runner.
        pytest.param({"reload": True, "workers": 2}, id="reload-and-workers"),
        pytest.param({"log_config": {"version": 1}}, id="log-config-dict"),
    ],
)
def test_valid_options_are_accepted(options: dict[str, Any]) -> None:
    config = Config(**options)
    for name, value in options.items():
        if name != "headers":
            assert getattr(config, name) == value


def test_defaults_match_uvicorn() -> None:
    config = Config()
    assert (config.host, config.port, config.lifespan) == ("127.0.0.1", 8000, "auto")
    assert config.timeout_keep_alive == 5.0
    assert config.app_dir == "."
    assert config.effective_log_level == "info"
    assert config.forwarded_allow_ips == "127.0.0.1,::1"
    assert config.timeout_worker_healthcheck == 5.0


def test_headers_are_parsed_and_encoded() -> None:
    config = Config(headers=("X-Frame-Options: DENY", ("x-b", "2")))
    assert config.headers == (("X-Frame-Options", "DENY"), ("x-b", "2"))
    assert config.default_headers == (
        (b"server", b"trioserve"),
        (b"x-frame-options", b"DENY"),
        (b"x-b", b"2"),
    )
    assert Config(server_header=False).default_headers == ()


def test_root_path_trailing_slash_is_stripped() -> None:
    assert Config(root_path="/api/").root_path == "/api"


def test_bind_host_strips_ipv6_brackets() -> None:
    assert Config(host="[::1]").bind_host == "::1"
    assert Config(host="::1").bind_host == "::1"


def test_replace_revalidates() -> None:
    config = Config()
    assert dataclasses.replace(config, port=0).port == 0
    with pytest.raises(ConfigError, match="port must be between 0 and 65535, got 65536"):
        dataclasses.replace(config, port=65536)
    with pytest.raises(ConfigError, match="mutually exclusive"):
        dataclasses.replace(Config(uds="/tmp/a.sock"), fd=4)


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


def test_unknown_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="prot"):
        Config(prot=80)  # type: ignore[call-arg]


def test_config_pickles_and_round_trips_through_json() -> None:
    config = Config(
        port=0,
        headers=("X-A: 1",),
        reload_dirs=("src",),
        timeout_graceful_shutdown=2.5,
        lifespan="on",
    )
    assert pickle.loads(pickle.dumps(config)) == config
    data = json.loads(json.dumps(config.to_dict()))  # tuples become lists on the way
    assert Config(**data) == config
    assert set(data) == {f.name for f in dataclasses.fields(Config)}


def test_log_config_dict_keeps_config_hashable_and_comparable() -> None:
    config = Config(log_config={"version": 1, "loggers": {}})
    assert hash(config) == hash(Config(log_config={"version": 1}))  # the dict is not hashed
    assert config == Config(log_config={"version": 1, "loggers": {}})
    assert config != Config(log_config={"version": 1})
