"""The exception tree: every exception class sipwire defines derives from SipwireError, by kind."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import sipwire
from sipwire import errors
from sipwire.config import ConfigError
from sipwire.console.source import TransportDownError
from sipwire.transport.framing import FramingError
from sipwire.transport.sipuri import SipUriError
from sipwire.transport.streams import StreamError
from sipwire.transport.tls import TlsConfigError, TlsVerifyError


def _defined_exceptions() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(sipwire.__path__, "sipwire."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__ == module.__name__:
                found.append(value)
    return found


def test_every_exception_of_ours_derives_from_sipwire_error() -> None:
    found = _defined_exceptions()
    assert len(found) >= 20
    strays = [f"{cls.__module__}.{cls.__qualname__}" for cls in found if not issubclass(cls, errors.SipwireError)]
    assert strays == []


def test_kinds() -> None:
    assert issubclass(ConfigError, errors.ConfigurationError)
    assert issubclass(TlsConfigError, errors.ConfigurationError)
    assert issubclass(TlsConfigError, errors.TlsError)
    assert issubclass(TlsVerifyError, errors.TlsError)
    assert issubclass(FramingError, errors.ProtocolError)
    assert issubclass(SipUriError, errors.ProtocolError)
    assert issubclass(SipUriError, ValueError)  # callers that catch ValueError keep working
    assert issubclass(StreamError, errors.ConnectionIOError)
    assert issubclass(TransportDownError, errors.ControlError)


def test_the_tree_in_the_docstring_names_every_exception() -> None:
    doc = errors.__doc__ or ""
    missing = [cls.__qualname__ for cls in _defined_exceptions() if not cls.__qualname__.startswith("_")]
    assert [name for name in missing if name not in doc] == []
