"""Fixtures for the web app's browser tests: a real `conjure ui` server (a subprocess on a free port with a
temporary workspace, as a user starts it) and a headless Chromium driven by Playwright.

The browser is Debian's /usr/bin/chromium (Playwright cannot download its own here). Without it the browser
tests skip, saying why, unless CONJURE_REQUIRE_BROWSER is set (CI sets it: there a missing browser fails).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("CONJURE_CHROMIUM", "/usr/bin/chromium"))
# Chromium on a closed network: without the background-networking flags its own connections are refused and
# it stalls; the sandbox needs privileges containers lack.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    url: str  # the address `conjure ui` printed (with ?token=)
    base: str  # http://127.0.0.1:PORT
    token: str
    workspace: Path
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def start_server(workspace: Path, log: Path, token: str) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "conjure", "ui", "--port", str(port), "--workspace", str(workspace),
               "--token", token]
    out = log.open("w", encoding="utf-8")
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"conjure ui exited with {process.returncode}:\n{log.read_text()}")
        lines = [line for line in log.read_text().splitlines() if line.startswith("open http")]
        if lines:
            try:  # printed before uvicorn listens: wait until it answers
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return Server(lines[0].split()[1], f"http://127.0.0.1:{port}", token, workspace, process, log)
            except OSError:
                pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"conjure ui did not start in 30 s:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)  # as Ctrl-C: uvicorn shuts down, the app stops its runner
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ui-server")
    server = start_server(folder / "workspace", folder / "server.log", token="e2e-token-e2e-token")
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium); set CONJURE_CHROMIUM to use another"
        if os.environ.get("CONJURE_REQUIRE_BROWSER"):
            pytest.fail(f"CONJURE_REQUIRE_BROWSER is set but the browser tests cannot run: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, ui_server):
    """A fresh browser tab (no cookies, no stored drafts) opened at the address the server printed. The page's
    script errors and failed API calls fail the test."""
    context = browser.new_context(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
    context.set_default_timeout(15_000)
    tab = context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    # (a refused request logs "Failed to load resource" too: the tests check the answers they provoke themselves)
    tab.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
           if msg.type == "error" and not msg.text.startswith("Failed to load resource") else None)
    tab.goto(ui_server.url)
    yield tab
    context.close()
    assert not problems, "\n".join(problems)
