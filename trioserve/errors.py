"""The exception hierarchy: who caused an error decides its class (layer 0, no logic).

* operator mistakes: :class:`ConfigError`, :class:`AppLoadError`;
* the application: :class:`LifespanError`, :class:`AppProtocolError`;
* the peer: :class:`ClientDisconnected` (raised into the app's ``send()``).

Each class has exactly one place that catches it (see STYLE.md §1.8); only ``cli.py`` maps
them to exit codes.
"""

from __future__ import annotations


class TrioserveError(Exception):
    """Base class for every error trioserve raises on purpose."""


class ConfigError(TrioserveError, ValueError):
    """An option or a combination of options is invalid (CLI exit code 2)."""


class AppLoadError(TrioserveError):
    """The application import string, attribute or factory could not be resolved (exit 1)."""


class LifespanError(TrioserveError):
    """Lifespan startup failed or the app reported ``lifespan.startup.failed`` (exit 3).

    Attributes:
        app_exception: the exception the app raised, if it raised one.
    """

    def __init__(self, message: str, app_exception: BaseException | None = None) -> None:
        super().__init__(message)
        self.app_exception = app_exception


# The name issue #5 asks for; the same class.
StartupFailed = LifespanError


class BindError(TrioserveError, OSError):
    """A socket to listen on could not be set up: address in use or not available, host not
    resolvable, ``--fd`` not a stream socket (operator's error, CLI exit code 1).

    An :class:`OSError` (with ``errno``), so ``except OSError`` still catches it; the CLI
    catches only this class, so an ``OSError`` raised by the app's own code keeps its
    traceback.
    """


class AppProtocolError(TrioserveError):
    """The app sent an invalid or out-of-order ASGI message; raised inside its ``send()``."""


class ClientDisconnected(OSError):
    """``send()`` was called after the client went away (ASGI HTTP spec 2.4).

    It subclasses :class:`OSError` as the spec requires, so frameworks that catch
    ``OSError`` (Starlette's ``StreamingResponse``) stop streaming cleanly.
    """
