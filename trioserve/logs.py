"""Logging setup: the default dictConfig, ``--log-config`` files, the formatters (layer 4).

Nothing here runs at import time; :func:`configure_logging` is called by the runner and
the worker processes. Library code only ever uses ``logging.getLogger(__name__)`` (all
under ``trioserve``) and ``trioserve.access`` for access lines.
"""

from __future__ import annotations

import configparser
import copy
import json
import logging
import logging.config
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

from .access_format import access_fields
from .config import Config
from .errors import ConfigError
from .message_trace import TRACE_LOG_LEVEL

LEVELS: Final = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE_LOG_LEVEL,
}


# ANSI colours for the level prefix (--use-colors), as uvicorn shows them.
_LEVEL_COLORS: Final = {
    TRACE_LOG_LEVEL: "\x1b[34m",
    logging.DEBUG: "\x1b[36m",
    logging.INFO: "\x1b[32m",
    logging.WARNING: "\x1b[33m",
    logging.ERROR: "\x1b[31m",
    logging.CRITICAL: "\x1b[91m",
}
_RESET: Final = "\x1b[0m"


class LevelPrefixFormatter(logging.Formatter):
    """``INFO:     message``: uvicorn's familiar layout, level name padded to 10 columns.

    Args:
        use_colors: colour the level name; None colours only when ``stream`` is a TTY.
        stream: ``"stdout"`` or ``"stderr"``, the stream the handler writes to.
    """

    def __init__(
        self,
        fmt: str | None = None,
        datefmt: str | None = None,
        style: Any = "%",
        use_colors: bool | None = None,
        stream: str = "stderr",
    ) -> None:
        super().__init__(fmt, datefmt, style)
        if use_colors is None:
            target = sys.stdout if stream == "stdout" else sys.stderr
            use_colors = bool(getattr(target, "isatty", lambda: False)())
        self.use_colors = use_colors

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"{record.levelname}:"
        padding = " " * max(0, 10 - len(prefix))
        if self.use_colors:
            color = _LEVEL_COLORS.get(record.levelno, "")
            prefix = f"{color}{record.levelname}{_RESET}:" if color else prefix
        record.levelprefix = prefix + padding
        return super().format(record)


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``, ``exc_info`` when there is a traceback, and for access lines the
    access fields (``client``, ``method``, ``path``, ``query``, ``status``, ``bytes``,
    ``duration``, ``request_id``, ...; see ``access_format``)."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.fromtimestamp(record.created, tz=timezone.utc)
        data: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        scope = getattr(record, "asgi_scope", None)
        if isinstance(scope, dict):
            fields = access_fields(
                scope,
                getattr(record, "status_code", None),
                getattr(record, "body_bytes", 0),
                getattr(record, "duration", 0.0),
            )
            fields["duration"] = float(fields["duration"])
            del fields["duration_ms"]
            fields["aborted"] = bool(getattr(record, "aborted", False))
            data.update(fields)
        if record.exc_info:
            data["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exc_info"] = record.exc_text
        return json.dumps(data, default=str)


def default_logging_config(config: Config | None = None) -> dict[str, Any]:
    """The dictConfig used without ``--log-config``, following ``--log-format`` and
    ``--use-colors``."""
    use_colors = config.use_colors if config is not None else None
    if config is not None and config.log_format == "json":
        formatters: dict[str, Any] = {
            "default": {"()": JSONFormatter},
            "access": {"()": JSONFormatter},
        }
    else:
        formatters = {
            "default": {
                "()": LevelPrefixFormatter,
                "fmt": "%(levelprefix)s%(message)s",
                "use_colors": use_colors,
                "stream": "stderr",
            },
            "access": {
                "()": LevelPrefixFormatter,
                "fmt": "%(levelprefix)s%(message)s",
                "use_colors": use_colors,
                "stream": "stdout",
            },
        }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": formatters,
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            },
            "access": {
                "class": "logging.StreamHandler",
                "formatter": "access",
                "stream": "ext://sys.stdout",
            },
        },
        "loggers": {
            "trioserve": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "trioserve.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
    }


def configure_logging(config: Config) -> None:
    """Install the default logging config or the one from ``--log-config``, then apply
    ``--log-level`` and ``--no-access-log``.

    Raises:
        ConfigError: the log config file is missing, unreadable or malformed.
    """
    logging.addLevelName(TRACE_LOG_LEVEL, "TRACE")
    if config.log_config is None:
        logging.config.dictConfig(default_logging_config(config))
    else:
        load_log_config(config.log_config)
    if config.log_level is not None:
        level = LEVELS[config.log_level]
        logging.getLogger("trioserve").setLevel(level)
        logging.getLogger("trioserve.access").setLevel(level)
    if not config.access_log:
        access = logging.getLogger("trioserve.access")
        access.handlers = []
        access.propagate = False
        access.disabled = True


def load_log_config(source: str | dict[str, Any]) -> None:
    """Apply a logging configuration file (``.json``, ``.yaml``/``.yml`` or ini-style) or,
    as uvicorn's ``run(log_config=...)`` accepts, a ``logging.config.dictConfig`` dict."""
    path = "dict" if isinstance(source, dict) else source
    file = Path(path)
    if isinstance(source, str) and not file.is_file():
        raise ConfigError(f"log_config file not found: {path}")
    try:
        if isinstance(source, dict):
            # A copy: the caller's dict stays as it was (dictConfig and the alias edit theirs).
            logging.config.dictConfig(_alias_error_logger(copy.deepcopy(source)))
        elif file.suffix == ".json":
            logging.config.dictConfig(_alias_error_logger(json.loads(file.read_text())))
        elif file.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError("a .yaml log_config needs PyYAML: pip install pyyaml") from None
            try:
                data = yaml.safe_load(file.read_text())
            except yaml.YAMLError as exc:
                raise ConfigError(f"invalid log_config {path}: {exc}") from None
            logging.config.dictConfig(_alias_error_logger(data))
        else:
            logging.config.fileConfig(path, disable_existing_loggers=False)
    except ConfigError:
        raise
    except (
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        ImportError,
        OSError,
        configparser.Error,
        RuntimeError,  # fileConfig wraps parse errors in it (3.11+)
    ) as exc:
        raise ConfigError(f"invalid log_config {path}: {exc}") from None


def _alias_error_logger(data: Any) -> Any:
    """Accept uvicorn-style ``trioserve.error`` as the name of the error logger.

    trioserve's own messages come from ``trioserve.<module>`` loggers, all below
    ``trioserve``; a dict config that names ``trioserve.error`` (and not ``trioserve``)
    means that parent.
    """
    if isinstance(data, dict):
        loggers = data.get("loggers")
        if (
            isinstance(loggers, dict)
            and "trioserve.error" in loggers
            and "trioserve" not in loggers
        ):
            loggers["trioserve"] = loggers.pop("trioserve.error")
    return data
