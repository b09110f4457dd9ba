"""The one exception tree of sipwire: catch a kind, or everything of ours, in one ``except``.

Every exception sipwire raises on purpose derives from :class:`SipwireError`,
grouped by kind; each concrete class lives in the module that raises it::

    SipwireError
    ├── ConfigurationError            a setting, file or asset cannot be used; the process does not start
    │   ├── ConfigError                   sipwire.config: a setting's value is invalid
    │   ├── StartupError                  transport.server: address in use, control socket taken...
    │   ├── RouterLoadError               transport.routing: the router cannot be imported
    │   ├── TlsConfigError (+ TlsError)   transport.tls: certificate or key unusable
    │   ├── ConsoleStartupError           console.serve: the console cannot listen
    │   ├── AssetsMissingError            console.assets: templates or browser assets not installed
    │   ├── StateDirError                 sipwire.statedir: a state directory another user could control
    │   ├── AuthSetupError                console.auth: the admin token cannot be set up
    │   └── NoUsersError                  transport.routers.proxy: the proxy would authenticate nobody
    ├── TlsError                      a TLS peer or configuration failed
    │   ├── TlsVerifyError                transport.tls: an outbound peer's name does not match
    │   └── TlsConfigError
    ├── ProtocolError                 bytes from a peer do not follow the protocol; one connection or message is refused
    │   ├── FramingError                  transport.framing: SIP stream framing broken
    │   ├── WebSocketClosedError          transport.wsframing: a WebSocket closed, refused or broken by its peer
    │   ├── SipParseError                 transport.sip: not a valid SIP message
    │   ├── SipUriError (+ ValueError)    transport.sipuri: not a usable SIP URI
    │   ├── WireError                     transport.wire: a worker channel's records are corrupt
    │   └── OtlpDecodeError               console.otlpdecode: a POST /v1/traces body is not OTLP
    ├── ConnectionIOError             a socket or TLS stream cannot go on (reset, refused, timed out)
    │   ├── StreamError                   transport.streams
    │   └── StateError                    transport.connection: a transition the state machine forbids
    ├── ControlError                  a control-socket request failed or was refused (this module)
    │   ├── TransportDownError            console.source: the transport does not answer
    │   ├── TransportRefusedError         console.source: it answered with a refusal
    │   └── CaptureSlowError              console.source: a call-flow query outlasted its time (not "down")
    ├── StatsError                    the shared-memory stats block cannot be read (this module)
    │   ├── StatsUnavailableError, StatsLayoutError, StatsWriterGoneError   transport.statsblock.reader
    │   └── StatsBusyError                                                 transport.statsblock.writer
    └── StoreError                    the registrar's store refused or could not answer (this module)
        ├── StoreBusyError                transport.routers.sqlitestore: the database stayed locked too long
        ├── UserError                     transport.routers.store: no such user, already exists, not USER@DOMAIN
        └── PasswordError                 sipwire.usercmd: a password too short, or two prompts that differ

Messages are full sentences that name the offending value. Library errors
(``OSError``, ``OpenSSL.SSL.Error``) are translated once, where they are
caught, with ``raise ... from``.
"""

from __future__ import annotations


class SipwireError(Exception):
    """Base of every exception sipwire raises on purpose."""


class ConfigurationError(SipwireError):
    """A setting, file or asset cannot be used; the process cannot start with it."""


class TlsError(SipwireError):
    """A TLS configuration or peer failed."""


class ProtocolError(SipwireError):
    """Bytes from a peer do not follow the protocol they claim; the message says where."""


class ConnectionIOError(SipwireError):
    """A connection's socket or TLS stream cannot go on."""


class ControlError(SipwireError):
    """A control request was refused or could not be made; the message says why."""


class StatsError(SipwireError):
    """The stats block cannot be read; the message says why and what to do."""


class StoreError(SipwireError):
    """The registrar's store refused a change or could not answer in time; the message says which."""
