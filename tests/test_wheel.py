"""The wheel: built from the checkout, installed without ``-e`` in a venv of its own, run from outside the checkout.

The wheel is built once per session from a copy of the checkout's files
(what git tracks or would track, plus the ``console/static/`` that ``npm ci``
generated), so no ``build/`` folder is left in the checkout and no file
left there by an earlier build can slip into the wheel.

It is installed with ``--no-deps`` into a fresh venv (``--without-pip``,
no system site-packages); a ``.pth`` file then adds the test venv's
site-packages *after* the venv's own, so the dependencies (FastAPI,
uvicorn, ...) need no download. That path is appended, not processed as a
site directory, so the test venv's editable-install finder (which maps
``sipwire`` to the checkout) is never installed there: each test below
proves that the code and files that run are the wheel's copy, under the
temporary venv, and that the checkout's top-level ``transport``,
``console`` and ``otel`` cannot be imported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from sipwire.console.assets import REQUIRED, STATIC, AssetsMissingError, find_assets, missing_static
from tests.conftest import REPO, wait_for

PAGES = ("/", "/connections", "/threads", "/traces", "/login")
LISTENING = re.compile(r"console listening on (http://\S+?)/ ")
URL = re.compile(r"https?://[^\s\"'<>`)]+")
#: Written in instructions, not fetched: the traces page says where to point OTEL_EXPORTER_OTLP_TRACES_ENDPOINT.
PLACEHOLDER_HOSTS = frozenset({"HOST:PORT"})
START_SECONDS = 30.0
STOP_SECONDS = 15.0
CHROMIUM = Path("/usr/bin/chromium")


def _run(command: list[str], **options: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False, **options)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def _checkout_files() -> list[Path]:
    """The checkout's files as git sees them (tracked, and untracked but not ignored), relative to it."""
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO).stdout
    return [Path(name) for name in sorted(set(listed.split("\0"))) if name and os.path.lexists(REPO / name)]


def _copy_checkout(target: Path) -> Path:
    """The checkout's files without anything generated (no node_modules, no console/static, no build/)."""
    for name in _checkout_files():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target / name, follow_symlinks=False)  # sipwire/console etc. stay symlinks
    return target


def _pip_wheel(source: Path, dist: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w", str(dist),
         str(source)],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = missing_static(REPO)
    if missing:
        pytest.fail(f"the console's browser assets are missing ({', '.join(map(str, missing))}): run `npm ci` first")
    base = tmp_path_factory.mktemp("wheel")
    source = _copy_checkout(base / "source")
    shutil.copytree(REPO / STATIC, source / STATIC)
    built = _pip_wheel(source, base / "dist")
    assert built.returncode == 0, f"pip wheel failed:\n{built.stdout}\n{built.stderr}"
    (found,) = (base / "dist").glob("sipwire-*.whl")
    return found


def test_no_wheel_is_built_without_the_browser_assets(tmp_path: Path) -> None:
    refused = _pip_wheel(_copy_checkout(tmp_path / "source"), tmp_path / "dist")
    assert refused.returncode != 0
    assert "not building a wheel without the console's browser assets" in refused.stderr, refused.stderr
    assert "htmx.min.js" in refused.stderr and "run `npm ci`" in refused.stderr
    assert not list(tmp_path.glob("dist/*.whl"))


def test_missing_assets_say_what_to_run_in_a_checkout_and_in_an_install(tmp_path: Path) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "base.html").write_text("")
    with pytest.raises(AssetsMissingError, match="build the wheel after `npm ci`") as in_an_install:
        find_assets(tmp_path)
    (tmp_path / "package.json").write_text("{}")
    with pytest.raises(AssetsMissingError, match=re.escape(f"run `npm ci` in {tmp_path}")) as in_a_checkout:
        find_assets(tmp_path)
    for error in (in_an_install, in_a_checkout):
        for package, names in REQUIRED.items():
            assert all(str(tmp_path / STATIC / package / name) in str(error.value) for name in names)


@dataclass(frozen=True)
class Installed:
    venv: Path
    python: Path
    site_packages: Path
    outside: Path  # a working directory outside the checkout
    env: dict[str, str]

    def python_c(self, code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.python), "-c", code], capture_output=True, text=True, cwd=self.outside, env=self.env,
            timeout=60, check=False,
        )  # fmt: skip


@pytest.fixture(scope="session")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("installed")
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    # Installed before the .pth exists, so pip sees an empty venv (not the test venv's editable sipwire).
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          "--disable-pip-version-check", "-q", str(wheel)])  # fmt: skip
    site_packages = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    )
    ours = dict.fromkeys(sysconfig.get_paths()[kind] for kind in ("purelib", "platlib"))
    (site_packages / "_sipwire_test_dependencies.pth").write_text("".join(f"{path}\n" for path in ours))
    outside = base / "outside"
    outside.mkdir()
    assert not outside.resolve().is_relative_to(REPO.resolve())
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PYTHON", "SIPWIRE_", "OTEL_", "VIRTUAL_ENV"))
    }
    env |= {"PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", "VIRTUAL_ENV": str(venv)}
    return Installed(venv, python, site_packages, outside, env)


def test_the_wheel_holds_the_package_templates_and_browser_assets(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert all(name.startswith(("sipwire/", "sipwire-0.1.0.dist-info/")) for name in names), sorted(names)
        for module in ("cli.py", "transport/server.py", "console/app.py", "otel/setup.py", "templates/base.html"):
            assert f"sipwire/{module}" in names
        for package, files in REQUIRED.items():
            for name in files:
                inside = f"sipwire/console/static/{package}/{name}"
                assert archive.read(inside) == (REPO / STATIC / package / name).read_bytes(), inside
        assert not any("node_modules" in name for name in names)
        entry_points = archive.read("sipwire-0.1.0.dist-info/entry_points.txt").decode()
    assert "sipwire = sipwire.cli:main" in entry_points


def test_the_installed_wheel_is_what_imports_and_the_checkout_is_invisible(installed: Installed) -> None:
    for top_level in ("transport", "console", "otel"):
        result = installed.python_c(f"import {top_level}")
        assert result.returncode != 0 and f"No module named '{top_level}'" in result.stderr, (top_level, result)
    probe = installed.python_c(
        "import json, sipwire, sipwire.transport, sipwire.otel, sipwire.console.app\n"
        "from sipwire.console.assets import find_assets\n"
        "assets = find_assets()\n"
        "print(json.dumps([sipwire.__file__, sipwire.transport.__file__, sipwire.otel.__file__,\n"
        "                  sipwire.console.app.__file__, str(assets.templates), str(assets.htmx_dist),\n"
        "                  str(assets.swagger_ui)]))"
    )
    assert probe.returncode == 0, probe.stderr
    for path in json.loads(probe.stdout):
        assert Path(path).resolve().is_relative_to(installed.site_packages.resolve() / "sipwire"), path


class _Resources(HTMLParser):
    """What a browser would fetch to show the page: scripts, stylesheets, icons, images."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        url = values.get("href") if tag == "link" else values.get("src") if tag in ("script", "img") else None
        if url:
            self.urls.append(url)


def _resources(html: str) -> list[str]:
    parser = _Resources()
    parser.feed(html)
    return parser.urls


def _foreign_urls(text: str, origin: str) -> list[str]:
    """Every http(s) URL in ``text`` that is not on ``origin`` (placeholders in instructions aside)."""
    own = urlsplit(origin).netloc
    return [url for url in URL.findall(text) if urlsplit(url).netloc not in {own, *PLACEHOLDER_HOSTS}]


@dataclass
class RunningWheel:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


@pytest.fixture(scope="module")
def running(installed: Installed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningWheel]:
    """``sipwire run`` of the installed wheel on free ports, its own instance and state directory."""
    state = tmp_path_factory.mktemp("state")
    log_path = state / "run.log"
    command = [
        str(installed.venv / "bin" / "sipwire"), "run", "--tcp", "127.0.0.1:0", "--tls", "127.0.0.1:0",
        "--listen", "127.0.0.1:0", "--instance", "wheel", "--state-dir", str(state), "--workers", "1",
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, cwd=installed.outside, env=installed.env,
            start_new_session=True,  # its own process group: stopped as Ctrl-C would, checked empty afterwards
        )  # fmt: skip
    try:

        def up() -> str | None:
            assert process.poll() is None, f"sipwire run exited:\n{log_path.read_text(errors='replace')}"
            found = LISTENING.search(log_path.read_text(errors="replace"))
            if found is None:
                return None
            try:
                health = httpx.get(f"{found.group(1)}/api/health", timeout=2.0).json()
            except httpx.TransportError:
                return None
            return found.group(1) if health["status"] == "up" else None

        url = wait_for(up, START_SECONDS, "sipwire run (transport up, console answering)")
        yield RunningWheel(process, url, log_path)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
        try:
            status = process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        finally:
            leftover = _group_alive(process.pid)
            if leftover:
                os.killpg(process.pid, signal.SIGKILL)
    log = log_path.read_text(errors="replace")
    assert status == 0, f"sipwire run exited {status}:\n{log}"
    assert not leftover, f"processes of sipwire run outlived it:\n{log}"
    assert "transport stopped" in log and "Application shutdown complete" in log, log


def _group_alive(pgid: int) -> bool:
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.05)
    return True


def test_sipwire_run_of_the_wheel_runs_the_wheels_code(running: RunningWheel, installed: Installed) -> None:
    """The run process, its console and its workers: all the venv's interpreter, started outside the checkout."""
    pids = [running.process.pid, *_children(running.process.pid)]
    argvs = [_cmdline(pid).split(b"\0") for pid in pids]
    for pid, argv in zip(pids, argvs, strict=True):
        assert argv[0] == bytes(installed.python), argv
        assert Path(f"/proc/{pid}/cwd").resolve() == installed.outside.resolve(), argv
    modules = [argv[1:4] for argv in argvs]
    assert [b"-m", b"sipwire.cli", b"console"] in modules and [
        b"-m",
        b"sipwire.transport.worker",
        b"--index",
    ] in modules


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def test_pages_htmx_and_api_docs_are_served_with_nothing_from_elsewhere(
    running: RunningWheel, installed: Installed
) -> None:
    origin = running.url
    assets: dict[str, str] = {}  # asset URL -> the page that references it
    with httpx.Client(base_url=origin, timeout=10.0) as http:
        for path in (*PAGES, "/docs"):
            answer = http.get(path)
            assert answer.status_code == 200, (path, answer.status_code, answer.text[:500])
            assert answer.headers["content-type"].startswith("text/html"), path
            assert not _foreign_urls(answer.text, origin), (path, _foreign_urls(answer.text, origin))
            for url in _resources(answer.text):
                assets.setdefault(url, path)
        docs = http.get("/docs").text
        (spec_url,) = re.findall(r"url: '([^']+)'", docs)
        assets[spec_url] = "/docs"
        assert http.get("/redoc").status_code == 404, "ReDoc needs a CDN and web fonts: not offered"

        assert "/assets/htmx/htmx.min.js" in assets
        assert {"/assets/swagger-ui/swagger-ui-bundle.js", "/assets/swagger-ui/swagger-ui.css"} <= set(assets)
        static = installed.site_packages / "sipwire" / "console" / "static"
        fetched: set[str] = set()
        while assets:
            url, page = assets.popitem()
            absolute = urljoin(f"{origin}{page}", url)
            assert urlsplit(absolute).netloc == urlsplit(origin).netloc, (page, url)
            answer = http.get(absolute)
            assert answer.status_code == 200 and answer.content, (page, url, answer.status_code)
            fetched.add(urlsplit(absolute).path)
            if url.endswith(".css"):  # what a stylesheet loads in turn: images, fonts, its source map
                refs = re.findall(r"url\((?!\s*[\"']?data:)\s*[\"']?([^\"')]+)", answer.text)
                refs += re.findall(r"sourceMappingURL=(\S+?)\s*\*/", answer.text)
                assets |= {urljoin(absolute, ref): url for ref in refs if urljoin(absolute, ref) not in fetched}
        htmx = http.get("/assets/htmx/htmx.min.js").content
    assert htmx == (static / "htmx.org" / "htmx.min.js").read_bytes()
    assert "/openapi.json" in fetched and "/assets/swagger-ui/favicon-32x32.png" in fetched


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install chromium)")
def test_api_docs_render_in_a_browser_from_the_console_alone(running: RunningWheel) -> None:
    from playwright.sync_api import sync_playwright

    from tests.test_console_browser import CHROMIUM_FLAGS

    requested: list[str] = []
    failed: list[str] = []
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.on("requestfailed", lambda request: failed.append(request.url))
            page.on("response", lambda response: response.status >= 400 and failed.append(response.url))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{running.url}/docs")
            page.get_by_text("/api/threads").first.wait_for(timeout=15_000)  # the operations of /openapi.json
            page.goto(f"{running.url}/")
            page.wait_for_function("() => window.htmx !== undefined", timeout=15_000)
        finally:
            browser.close()
    assert requested and not errors and not failed, (errors, failed)
    assert all(urlsplit(url).netloc == urlsplit(running.url).netloc for url in requested), requested
