"""The ``sipwire`` command: run the transport, or talk to a running one.

Subcommands follow the contract in the architecture notes: ``run``,
``transport``, ``ctl`` (threads, stats, connections, close, health),
``users`` (the proxy's users, :mod:`sipwire.usercmd`), plus ``config`` to
print every setting with its value and description.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from sipwire import usercmd
from sipwire.config import ConfigError, Settings, descriptions, load
from sipwire.errors import ConfigurationError, ControlError
from sipwire.supervisor import ConsoleSupervisor
from sipwire.transport.control import ControlClient
from sipwire.transport.routing import load_router
from sipwire.transport.server import TransportServer
from sipwire.transport.statsblock import HISTOGRAM_NAMES, StatsError, StatsReader, connections_view, stats_view

#: ``ctl stats`` and ``ctl connections`` wait this long for figures written after the command
#: started (I/O threads write every 0.25 s); past it they print older ones and say how old.
FRESH_WAIT_SECONDS = 1.0


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instance", help="instance name (default: default)")
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")


def _add_transport_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tcp", metavar="HOST:PORT", help="TCP listen address (default 127.0.0.1:5060)")
    parser.add_argument("--tls", metavar="HOST:PORT", help="TLS listen address (default 127.0.0.1:5061)")
    parser.add_argument("--ws", metavar="HOST:PORT", help="SIP over WebSocket listen address (default: off)")
    parser.add_argument("--wss", metavar="HOST:PORT", help="SIP over secure WebSocket listen address (default: off)")
    parser.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain (default: generated dev cert)")
    parser.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-ca", metavar="FILE", help="PEM CA bundle for client and outbound verification")
    parser.add_argument("--threads", type=int, metavar="N", help="I/O threads at start (default 2)")
    parser.add_argument("--workers", type=int, metavar="N", help="worker processes (default: CPU count)")
    parser.add_argument("--cpu-affinity", metavar="CPUS", help="CPUs for I/O threads and workers, e.g. 1 or 0,2-3")
    parser.add_argument(
        "--busy-poll-us", type=int, metavar="US", help="poll this long for workers' answers, not sleep (0: off)"
    )
    parser.add_argument("--router", metavar="NAME", help="responder, proxy or module:function (default responder)")
    parser.add_argument("--upstream", metavar="SIP-URI", help="where the proxy router forwards requests")
    parser.add_argument("--state-dir", metavar="DIR", help="directory for the control socket and generated files")
    parser.add_argument(
        "--open-registrar",
        action="store_true",
        default=None,
        help="labs only: the proxy router authenticates nobody (needed to start it without users)",
    )
    _add_log_level(parser)


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="least severe log lines shown (default info)"
    )


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sipwire", description="Observable SIP transport over TCP, TLS and WebSocket."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "run the transport, its workers and the console together, on embedded defaults"),
        ("transport", "run the transport process and its worker pool"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        _add_common(command)
        _add_transport_flags(command)
        if name == "run":
            command.add_argument("--listen", dest="console_listen", metavar="HOST:PORT", help="console address")
    text = "run the ops console (web pages, REST API, /metrics) for a running transport"
    console = commands.add_parser("console", help=text, description=text)
    _add_common(console)
    console.add_argument(
        "--listen", dest="console_listen", metavar="HOST:PORT", help="console address (default 127.0.0.1:8080)"
    )
    console.add_argument("--state-dir", metavar="DIR", help="directory of the transport's control socket")
    _add_log_level(console)
    # sipwire run passes the read end of a pipe it holds open: EOF means it is gone, so the console stops.
    console.add_argument("--lifeline", type=int, metavar="FD", help=argparse.SUPPRESS)
    text = "print every setting: value and description"
    config = commands.add_parser("config", help=text, description=text)
    _add_common(config)
    config.add_argument("--markdown", action="store_true", help="print the settings reference (docs/CONFIGURATION.md)")
    users = usercmd.add_parser(commands)
    _add_common(users)
    users.add_argument("--state-dir", metavar="DIR", help="directory of the instance's runtime files")
    text = "ask a running transport: its stats block (stats, connections) or its control socket (the rest)"
    ctl = commands.add_parser("ctl", help=text, description=text)
    _add_common(ctl)
    ctl.add_argument("--state-dir", metavar="DIR", help="directory of the control socket")
    actions = ctl.add_subparsers(dest="action", required=True)
    text = "show the I/O pool, or resize it to SIZE threads at runtime"
    threads = actions.add_parser("threads", help=text, description=text)
    threads.add_argument("size", nargs="?", type=int, metavar="SIZE", help="wanted I/O threads, 1..max_threads")
    _add_json(threads)
    for name, text in (
        ("stats", "counters, queues, workers and latency histograms"),
        ("health", "is the transport up, its pid, uptime and listening addresses"),
    ):
        _add_json(actions.add_parser(name, help=text, description=text))
    text = "list open connections (read from the stats block)"
    connections = actions.add_parser("connections", help=text, description=text)
    _add_json(connections)
    connections.add_argument("--state", help="only connections in this state (connecting, handshake, open, closing)")
    connections.add_argument("--limit", type=int, default=1000, help="list at most this many (default 1000)")
    text = "close one connection by id"
    close = actions.add_parser("close", help=text, description=text)
    close.add_argument("id", type=int, metavar="ID", help="connection id, as ctl connections lists it")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        name: getattr(args, name, None)
        for name in (
            "instance",
            "tcp",
            "tls",
            "ws",
            "wss",
            "tls_cert",
            "tls_key",
            "tls_ca",
            "threads",
            "workers",
            "busy_poll_us",
            "cpu_affinity",
            "router",
            "upstream",
            "state_dir",
            "log_level",
            "console_listen",
            "open_registrar",
        )
    }
    return load(args.config, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (``sipwire config | head``): not an error worth a traceback. Point
        # stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as error:
        print(f"sipwire: configuration error: {error}", file=sys.stderr)
        return 2
    if args.command == "run":
        return _run_all(settings, args)
    if args.command == "console":
        from sipwire.console.serve import serve  # noqa: PLC0415 - the transport needs no web framework

        return serve(settings, args.lifeline)
    if args.command == "transport":
        return _run_transport(settings)
    if args.command == "users":
        return usercmd.run(settings, args)
    if args.command == "config":
        print(settings_reference() if args.markdown else _settings_text(settings))
        return 0
    try:
        return _ctl(settings, args)
    except (ControlError, StatsError) as error:
        print(f"sipwire ctl: {error}", file=sys.stderr)
        return 1


def _settings_text(settings: Settings) -> str:
    return "\n".join(f"{name} = {getattr(settings, name)!r}\n    {text}" for name, text in descriptions().items())


def settings_reference() -> str:
    """The settings reference in Markdown, generated from :class:`Settings` (kept in docs/)."""
    defaults = Settings()
    lines = [
        "# Configuration reference",
        "",
        "Generated by `sipwire config --markdown`; a test keeps it in sync with `sipwire/config.py`.",
        "Every setting can be given in a TOML file (`--config FILE`, top-level `name = value`),",
        "as an environment variable `SIPWIRE_<NAME>` (upper case), or, for the common ones, as a flag;",
        "later sources win in that order. `workers` defaults to the machine's CPU count.",
        "",
        "| setting | default | description |",
        "|---|---|---|",
    ]
    for name, text in descriptions().items():
        default = "CPU count" if name == "workers" else repr(getattr(defaults, name))
        lines.append(f"| `{name}` | `{default}` | {text} |")
    return "\n".join(lines)


def _configure_logging(settings: Settings, process: str) -> None:
    """One log format for every sipwire process (the first call wins: ``run`` labels its lines ``run``)."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s {process}[%(process)d] %(levelname)s %(name)s: %(message)s",
    )


def _run_transport(settings: Settings) -> int:
    _configure_logging(settings, "transport")
    try:
        router = load_router(settings.router)  # fail here, clearly, rather than in every worker
        if router.preflight is not None:
            router.preflight(settings)
        server = TransportServer(settings, announce_closes=router.connections_closed is not None)
        server.start()
    except (ConfigurationError, ControlError, OSError) as error:
        logging.getLogger("sipwire").error("cannot start: %s", error)
        return 1
    server.serve_forever()
    return 0


def _run_all(settings: Settings, args: argparse.Namespace) -> int:
    """``sipwire run``: the transport (and its workers) in this process, the console as a watched child.

    A console that exits is logged and started again with back-off
    (:mod:`sipwire.supervisor`); when the transport ends, for any reason,
    the console is stopped and reaped.
    """
    command = [sys.executable, "-m", "sipwire.cli", "console", "--instance", settings.instance]
    command += ["--listen", settings.console_listen, "--log-level", settings.log_level]
    if args.config:
        command += ["--config", args.config]
    if settings.state_dir:
        command += ["--state-dir", settings.state_dir]
    _configure_logging(settings, "run")
    supervisor = ConsoleSupervisor(command)
    supervisor.start()
    status = 1
    try:
        status = _run_transport(settings)
    finally:
        supervisor.stop("the transport stopped" if status == 0 else "the transport could not start")
    return status


def _ctl(settings: Settings, args: argparse.Namespace) -> int:
    if args.action in ("stats", "connections"):
        return _ctl_from_block(settings, args)
    with ControlClient(settings.control_path) as client:
        if args.action == "threads":
            result = client.request("threads", **({"size": args.size} if args.size is not None else {}))
            _print(result, args.json, _threads_table)
        elif args.action == "health":
            _print(client.request("health"), args.json, _health_text)
        elif args.action == "close":
            client.request("close", id=args.id)
            print(f"connection {args.id} closed")
    return 0


def _ctl_from_block(settings: Settings, args: argparse.Namespace) -> int:
    """``stats`` and ``connections`` read the shared-memory stats block: nothing is asked of the
    transport, so they answer while it is saturated (the control socket would queue behind it)."""
    if args.action == "connections" and args.limit < 1:
        raise ControlError(f"limit {args.limit} must be at least 1")
    since = time.monotonic()
    with StatsReader.for_settings(settings) as reader:
        fresh = reader.wait_fresh(since, FRESH_WAIT_SECONDS)
        header = reader.require_live(allow_stale=True)
        if args.action == "stats":
            _print(stats_view(reader), args.json, _stats_text)
        else:
            _print(connections_view(reader.connections(), state=args.state, limit=args.limit), args.json,
                   _connections_table)  # fmt: skip
    if not fresh:
        print(
            f"sipwire ctl: the transport (pid {header.writer_pid}) last updated its stats {header.age:.1f}s ago: "
            "it is busy or stuck; these figures are that old",
            file=sys.stderr,
        )
    return 0


def _print(result: Any, as_json: bool, render: Any) -> None:
    print(json.dumps(result, indent=2) if as_json else render(result))


def _threads_table(result: dict[str, Any]) -> str:
    lines = [f"I/O threads: {result['size']} (max {result['max']})", "index  connections  load   queue_depth  jobs"]
    for t in result["threads"]:
        lines.append(f"{t['index']:>5}  {t['connections']:>11}  {t['load']:>5.2f}  {t['queue_depth']:>11}  {t['jobs']}")
    return "\n".join(lines)


def _stats_text(result: dict[str, Any]) -> str:
    """The ``--json`` figures as text, each under its JSON name (histograms in ms, as their names say)."""
    lines = [
        f"connections {result['connections']} (max_connections {result['max_connections']}), "
        f"queue_depth {result['queue_depth']}, dispatch_in_flight {result['dispatch_in_flight']}, "
        f"pending_write_bytes {result['pending_write_bytes']}",
        "counters:",
    ]
    lines += [f"  {name} {value}" for name, value in result["counters"].items()]
    for name in HISTOGRAM_NAMES:
        histogram = result[name]
        if not histogram["count"]:
            lines.append(f"{name}: no data yet")
            continue
        percentiles = ", ".join(f"{p} <= {_bound(histogram[p])}" for p in ("p50", "p95", "p99"))
        lines.append(f"{name}: {histogram['count']} observed, {percentiles}")
    lines.append("workers:")
    lines += [
        f"  {w['index']}: pid {w['pid']} {'up' if w['alive'] else 'DOWN'}, "
        f"in_flight {w['in_flight']}, restarts {w['restarts']}"
        for w in result["workers"]
    ]
    return "\n".join(lines)


def _bound(value: float | str | None) -> str:
    """A percentile's bucket bound: a number, ``+Inf`` (above the last bound), or ``-`` (none)."""
    return "-" if value is None else str(value)


def _health_text(result: dict[str, Any]) -> str:
    listening = ", ".join(f"{name} {address}" for name, address in result["listening"].items())
    return f"up, pid {result['pid']}, uptime {result['uptime']:.0f}s, {listening}"


def _connections_table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['total']} connections",
        "id      state       remote                 thread  age      msgs in/out",
    ]
    for c in result["connections"]:
        lines.append(
            f"{c['id']:<7} {c['state']:<11} {c['remote']:<22} {c['thread']:>6}  {c['age']:>7.1f}  "
            f"{c['messages_in']}/{c['messages_out']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
