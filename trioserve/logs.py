"""Logging setup: the default dictConfig, ``--log-config`` files, the formatters (layer 4).

Nothing here runs at import time; :func:`configure_logging` is called by the runner and
the worker processes. Library code only ever uses ``logging.getLogger(__name__)`` (all
under ``trioserve``) and ``trioserve.access`` for access lines.
"""

from __future__ import annotations

import json
import logging
import logging.config
from pathlib import Path
from typing import Any, Final

from .config import Config
from .errors import ConfigError

TRACE_LOG_LEVEL: Final = 5
LEVELS: Final = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE_LOG_LEVEL,
}


class LevelPrefixFormatter(logging.Formatter):
    """``INFO:     message``: uvicorn's familiar layout, level name padded to 10 columns."""

    def format(self, record: logging.LogRecord) -> str:
        record.levelprefix = f"{record.levelname}:".ljust(10)
        return super().format(record)


def default_logging_config() -> dict[str, Any]:
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "default": {"()": LevelPrefixFormatter, "fmt": "%(levelprefix)s%(message)s"},
            "access": {"()": LevelPrefixFormatter, "fmt": "%(levelprefix)s%(message)s"},
        },
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
        logging.config.dictConfig(default_logging_config())
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


def load_log_config(path: str) -> None:
    """Apply a logging configuration file: ``.json``, ``.yaml``/``.yml`` or ini-style."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"log_config file not found: {path}")
    try:
        if file.suffix == ".json":
            logging.config.dictConfig(json.loads(file.read_text()))
        elif file.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(
                    "a .yaml log_config needs PyYAML: pip install pyyaml"
                ) from None
            logging.config.dictConfig(yaml.safe_load(file.read_text()))
        else:
            logging.config.fileConfig(path, disable_existing_loggers=False)
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, ImportError, OSError) as exc:
        raise ConfigError(f"invalid log_config {path}: {exc}") from None
