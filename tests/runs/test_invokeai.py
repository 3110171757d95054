"""`conjure export --invokeai-url`: installs through InvokeAI's model-install API (conjure.runs.invokeai), tested
against a stand-in server with the endpoints of InvokeAI 6.13.8 (invokeai/app/api/routers/model_manager.py):
POST /api/v2/models/install?source=&inplace= answers 201 and a job, GET /api/v2/models/install/{id} the job as it
runs; a local source installed with inplace=false is moved into the models folder, as InvokeAI's install_path does.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from safetensors import safe_open

from conjure.runs.invokeai import install_via_api


class StandIn:
    """The install API's state: jobs by id, installed sources, and how it should misbehave."""

    def __init__(self, models: Path):
        self.models = models
        self.jobs: dict[int, dict] = {}
        self.installed: set[str] = set()
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self.refuse_files_with = ""  # file names holding this end in an error job (InvokeAI cannot identify them)
        self.login = False  # multi-user mode: every request without a token gets 401
        self.stuck = False  # jobs never finish

    def post_install(self, query: dict) -> tuple[int, dict]:
        source, inplace = query["source"][0], query["inplace"][0]
        if source in self.installed:
            return 409, {"detail": f"A model for {source} is already installed"}
        job = {"id": len(self.jobs) + 1, "status": "waiting", "source": {"path": source, "inplace": inplace == "true",
               "type": "local"}, "local_path": source, "config_out": None, "error": None, "error_reason": None}
        self.jobs[job["id"]] = job
        return 201, job

    def models_named(self, query: dict) -> tuple[int, dict]:
        name, kind = query["model_name"][0], query["model_type"][0]
        found = [job["config_out"] for job in self.jobs.values() if job["config_out"]]
        return 200, {"models": [m for m in found if m["name"] == name and m["type"] == kind]}

    def delete(self, key: str) -> tuple[int, dict | None]:
        for job in self.jobs.values():
            if job["config_out"] and job["config_out"]["key"] == key:
                job["config_out"] = None
                shutil.rmtree(self.models / key)
                return 204, None
        return 404, {"detail": f"unknown model {key}"}

    def get_job(self, job_id: int) -> tuple[int, dict]:
        job = self.jobs.get(job_id)
        if job is None:
            return 404, {"detail": f"No job with id {job_id} known"}
        if self.stuck:
            job["status"] = "running"
        elif job["status"] == "waiting":
            job["status"] = "running"
        elif job["status"] == "running":
            self.finish(job)
        return 200, job

    def finish(self, job: dict) -> None:
        path = Path(job["local_path"])
        if self.refuse_files_with and self.refuse_files_with in path.name:
            job.update(status="error", error_reason="InvalidModelConfigException",
                       error=f"Could not identify model for {path}")
            return
        with safe_open(str(path), framework="pt") as f:
            kind = "embedding" if "emb_params" in f.keys() else "lora"
        key = f"key-{job['id']}"
        (self.models / key).mkdir(parents=True)
        shutil.move(path, self.models / key / path.name)  # inplace=false: InvokeAI moves the file
        self.installed.add(str(path))
        job.update(status="completed", config_out={"key": key, "name": path.stem, "type": kind, "base": "sd-1",
                                                   "path": f"{key}/{path.name}"})


def serve(state: StandIn) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def answer(self, code: int, body: dict | None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def route(self, method: str) -> None:
            url = urllib.parse.urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state.requests.append((method, url.path, urllib.parse.parse_qs(url.query), body))
            if state.login:
                return self.answer(401, {"detail": "Authentication required"})
            if method == "POST" and url.path == "/api/v2/models/install":
                return self.answer(*state.post_install(urllib.parse.parse_qs(url.query)))
            if method == "GET" and url.path.startswith("/api/v2/models/install/"):
                return self.answer(*state.get_job(int(url.path.rsplit("/", 1)[1])))
            if method == "GET" and url.path == "/api/v2/models/":
                return self.answer(*state.models_named(urllib.parse.parse_qs(url.query)))
            if method == "DELETE" and url.path.startswith("/api/v2/models/i/"):
                return self.answer(*state.delete(url.path.rsplit("/", 1)[1]))
            self.answer(404, {"detail": "Not Found"})

        def do_POST(self) -> None:  # noqa: N802 - http.server's names
            self.route("POST")

        def do_GET(self) -> None:  # noqa: N802
            self.route("GET")

        def do_DELETE(self) -> None:  # noqa: N802
            self.route("DELETE")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def invokeai(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where conjure stages its copies
    (tmp_path / "tmp").mkdir()
    state = StandIn(tmp_path / "invokeai" / "models")
    server, url = serve(state)
    state.url = url
    yield state
    server.shutdown()
    server.server_close()


def test_installs_each_file_and_reports_the_models(invokeai, app_files_run, run_cli, tmp_path):
    before = sorted(p.read_bytes() for p in app_files_run.rglob("*.safetensors"))
    code, out, err = run_cli("export", app_files_run, "--step", "4", "--invokeai-url", invokeai.url + "/")
    assert code == 0, err
    assert out.splitlines() == [
        f"installed zq-lora.safetensors in InvokeAI at {invokeai.url}: lora 'zq-lora' for sd-1 (key key-1)",
        "in InvokeAI: pick zq-lora under Concepts (Add LoRA) in the Generation settings",
        f"installed zq-thing.safetensors in InvokeAI at {invokeai.url}: embedding 'zq-thing' for sd-1 (key key-2)",
        "in InvokeAI: type <zq-thing> in the prompt",
    ]
    assert [(method, path) for method, path, _, _ in invokeai.requests[:2]] == [("GET", "/api/v2/models/")] * 2
    posts = [r for r in invokeai.requests if r[0] == "POST"]
    assert [(path, query["inplace"], body) for _, path, query, body in posts] == [
        ("/api/v2/models/install", ["false"], b"{}")] * 2
    # InvokeAI moved staged copies, never the run's files; the staging folder is gone
    staged = [Path(query["source"][0]) for _, _, query, _ in posts]
    assert all(p.is_relative_to(tmp_path / "tmp") for p in staged)
    assert sorted(p.read_bytes() for p in app_files_run.rglob("*.safetensors")) == before
    moved = invokeai.models / "key-2" / "zq-thing.safetensors"
    assert moved.read_bytes() == (app_files_run / "checkpoints" / "step-000004" / "zq-thing.safetensors").read_bytes()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_second_install_of_a_name_needs_force_and_then_replaces_the_model(invokeai, app_files_run, run_cli,
                                                                              assert_one_line_error):
    assert run_cli("export", app_files_run, "--step", "2", "--invokeai-url", invokeai.url)[0] == 0
    posted = len(invokeai.jobs)
    code, _, err = run_cli("export", app_files_run, "--step", "4", "--invokeai-url", invokeai.url)
    assert_one_line_error(code, err, f"InvokeAI at {invokeai.url} has a lora named 'zq-lora' already (key key-1)",
                          "--force")
    assert len(invokeai.jobs) == posted  # nothing was installed
    code, out, err = run_cli("export", app_files_run, "--step", "4", "--invokeai-url", invokeai.url, "--force")
    assert code == 0, err
    assert "'zq-lora' for sd-1 (key key-3)" in out and "'zq-thing' for sd-1 (key key-4)" in out
    assert sorted(p.name for p in invokeai.models.iterdir()) == ["key-3", "key-4"]  # the old models were deleted


def test_a_bundle_is_left_out(invokeai, bundle_run, run_cli):
    code, out, err = run_cli("export", bundle_run, "--step", "2", "--invokeai-url", invokeai.url)
    assert code == 0, err
    assert len(invokeai.jobs) == 2 and out.splitlines()[-1] == (
        "left out zq-lora.bundle.safetensors: InvokeAI does not read an embedding bundled in a LoRA (the LoRA and "
        "embedding files hold the same)")


def test_a_failed_install_job_is_one_line_naming_the_file(invokeai, app_files_run, run_cli, tmp_path,
                                                          assert_one_line_error):
    invokeai.refuse_files_with = "thing"
    code, out, err = run_cli("export", app_files_run, "--step", "2", "--invokeai-url", invokeai.url)
    assert_one_line_error(code, err, f"InvokeAI at {invokeai.url} could not install zq-thing.safetensors: "
                          "Could not identify model for")
    assert list((tmp_path / "tmp").iterdir()) == []  # the copy InvokeAI refused is removed too


def test_a_file_installed_before_is_refused_by_invokeai(invokeai, app_files_run, run_cli, assert_one_line_error):
    original = invokeai.post_install
    invokeai.post_install = lambda query: (409, {"detail": "already installed"}) if "lora" in query["source"][0] \
        else original(query)
    code, _, err = run_cli("export", app_files_run, "--step", "2", "--invokeai-url", invokeai.url)
    assert_one_line_error(code, err, "zq-lora.safetensors is installed or being installed already (HTTP 409: "
                          "already installed)")


def test_a_login_is_asked_for(invokeai, app_files_run, run_cli, assert_one_line_error):
    invokeai.login = True
    code, _, err = run_cli("export", app_files_run, "--step", "2", "--invokeai-url", invokeai.url)
    assert_one_line_error(code, err, "asks for a login", "--to-app invokeai")


def test_an_unreachable_server_is_one_line(app_files_run, run_cli, assert_one_line_error, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, _, err = run_cli("export", app_files_run, "--step", "2", "--invokeai-url", f"http://127.0.0.1:{port}")
    assert_one_line_error(code, err, f"cannot reach InvokeAI at http://127.0.0.1:{port}: Connection refused",
                          "is it running?")
    assert not list(tmp_path.glob("conjure-invokeai-*"))


@pytest.mark.parametrize("url", ["127.0.0.1:9090", "ftp://host/", "http://"])
def test_a_url_that_is_not_http_is_refused(url, app_files_run, run_cli, assert_one_line_error):
    code, _, err = run_cli("export", app_files_run, "--step", "2", "--invokeai-url", url)
    assert_one_line_error(code, err, "--invokeai-url: InvokeAI's address")


def test_a_job_that_does_not_finish_keeps_its_file_for_invokeai(invokeai, app_files_run, tmp_path):
    invokeai.stuck = True
    with pytest.raises(Exception, match="has not finished installing zq-lora.safetensors after 0 s .*running"):
        install_via_api(app_files_run, 2, invokeai.url, timeout=0.2)
    assert len(list((tmp_path / "tmp").rglob("zq-lora.safetensors"))) == 1
