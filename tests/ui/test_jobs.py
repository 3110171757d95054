"""The job queue with real runs: tiny models trained by `python -m conjure train` subprocesses, as the web app
starts them. A run completes and the monitor shows it; a failing run fails with its error; cancel, shutdown and
resume; a server restart finds queued, killed and still-running jobs (conjure.ui.queue, conjure.ui.runner)."""

import os
import signal
import time

import pytest
from fastapi.testclient import TestClient

from conjure.ui.app import create_app
from conjure.ui.queue import checkpoint_steps
from conjure.ui.runner import JobQueue, same_process
from conjure.ui.training import check_config
from conjure.ui.workspace import Workspace

BASE = "http://127.0.0.1:7860"
LONG = 120  # steps of a run that is still going when the test acts on it (a tiny step takes ~25 ms)


@pytest.fixture
def workspace(tmp_path, image_folder):
    ws = Workspace(tmp_path / "workspace")
    ws.open_dataset(image_folder)  # a web job reads its data from an opened folder (or the workspace)
    yield ws
    # never leave a run behind, whatever a test did
    import sqlite3

    with sqlite3.connect(ws.db_path) as db:
        for job_id, pid in db.execute("SELECT id, pid FROM jobs WHERE pid IS NOT NULL").fetchall():
            if same_process(pid, ws.jobs / str(job_id) / "config.yaml"):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def make_config(tiny_models, image_folder):
    """A tiny textual_inversion config whose runs go to the workspace's runs/ (output_dir left at `runs`)."""

    def make(steps=6, **basic):
        return {
            "type": "textual_inversion",
            "basic": {"base_model": str(tiny_models("sd1")), "max_train_steps": steps, "save_every_n_steps": 3,
                      "validate_every_n_steps": 3, "seed": 3, **basic},
            "data": {"source": str(image_folder), "resolution": 64, "batch_size": 2},
            "textual_inversion": {"placeholder_token": "<zq-thing>", "initializer": "dog"},
            "validation": {"seeds": [0], "num_inference_steps": 1, "guidance_scale": 2.0},
            "optimizer": {"learning_rate": 0.05},
        }

    return make


def long_config(make_config, **basic):
    """A run long enough to act on while it trains: no validation, a checkpoint only when it stops or ends."""
    raw = make_config(LONG, **{"save_every_n_steps": 1000, "validate_every_n_steps": None, **basic})
    raw["validation"]["at_start"] = False
    return raw


def submit(queue, ws, raw):
    config, errors = check_config(ws, raw)
    assert not errors
    return queue.submit(config)


def until(condition, timeout=60.0, every=0.05, step=None):
    """Wait for `condition()` to be true (calling `step()` between tries), or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        if step:
            step()
        time.sleep(every)


def job_of(client, jid):
    return client.get(f"/api/jobs/{jid}").json()["job"]


def test_a_job_runs_and_the_monitor_shows_it(workspace, make_config, tmp_path):
    from safetensors.torch import load_file

    with TestClient(create_app(workspace, start_runner=True), base_url=BASE) as client:
        job = client.post("/api/jobs", json={"config": make_config()}).json()["job"]
        jid = job["id"]
        until(lambda: job_of(client, jid)["status"] not in ("queued", "running"), every=0.2)
        job = job_of(client, jid)
        assert job["status"] == "completed", client.get(f"/api/jobs/{jid}/log").json()
        run = workspace.runs / f"textual_inversion-{jid}"
        assert job["run_dir"] == str(run) and job["step"] == job["max_steps"] == 6
        assert isinstance(job["loss"], float) and job["error"] is None and job["resumable"] is False
        assert job["started"] and job["ended"] and job["eta_seconds"] is None
        assert (workspace.jobs / str(jid) / "config.yaml").is_file()

        answer = client.get(f"/api/jobs/{jid}/events").json()
        kinds = [e["event"] for e in answer["events"]]
        assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("step") == 6
        data = (run / "events.jsonl").read_bytes()
        assert answer["next"] == len(data)
        last_line = data.rstrip(b"\n").rfind(b"\n") + 1
        assert client.get(f"/api/jobs/{jid}/events", params={"after": last_line}).json()["events"] == [
            answer["events"][-1]]

        lines = client.get(f"/api/jobs/{jid}/log").json()["lines"]
        assert f"done: 6 steps in {run}" in lines
        assert any(line.startswith("100%") for line in lines)  # the progress bar's last redraw, alone

        gallery = client.get(f"/api/jobs/{jid}/validation").json()
        assert gallery["prompts"] and gallery["seeds"] == [0]
        assert [s["step"] for s in gallery["steps"]] == [0, 3, 6]
        image = client.get(gallery["steps"][-1]["images"][0]["url"])
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")

        checkpoints = client.get(f"/api/jobs/{jid}/checkpoints").json()["checkpoints"]
        assert [c["step"] for c in checkpoints] == [3, 6]
        assert checkpoints[0]["files"] == ["zq-thing.safetensors"]

        out = tmp_path / "my-app" / "embeddings"
        files = client.post(f"/api/jobs/{jid}/export", json={"step": 3, "to": str(out)}).json()["files"]
        assert files == [str(out / "zq-thing.safetensors")]
        assert load_file(files[0]).keys() == load_file(run / "checkpoints/step-000003/zq-thing.safetensors").keys()


def test_a_failing_run_fails_with_its_error(workspace, make_config, tmp_path):
    app = create_app(workspace, start_runner=True)
    with TestClient(app, base_url=BASE) as client:
        raw = make_config(base_model=str(tmp_path / "no-such-model"))
        jid = client.post("/api/jobs", json={"config": raw}).json()["job"]["id"]
        until(lambda: job_of(client, jid)["status"] not in ("queued", "running"), every=0.2)
        job = job_of(client, jid)
        assert job["status"] == "failed" and job["resumable"] is False
        assert job["error"].startswith(f"base model not found: '{tmp_path / 'no-such-model'}'")
        assert f"error: {job['error']}" in client.get(f"/api/jobs/{jid}/log").json()["lines"]
        # the server goes on
        assert client.get("/api/jobs").status_code == 200
        assert app.state.jobs._thread.is_alive()


@pytest.mark.slow
def test_cancel_shutdown_and_resume(workspace, make_config):
    """Cancel a running job (it saves and stops), resume it, stop the server while it runs (interrupted), and
    resume it on a new server to the end."""
    with TestClient(create_app(workspace, start_runner=True), base_url=BASE) as client:
        jid = client.post("/api/jobs", json={"config": long_config(make_config)}).json()["job"]["id"]
        until(lambda: job_of(client, jid)["step"] >= 2)
        job = client.post(f"/api/jobs/{jid}/cancel").json()["job"]
        assert job["status"] == "running" and job["stopping"] is True
        until(lambda: job_of(client, jid)["status"] != "running")
        job = job_of(client, jid)
        assert job["status"] == "cancelled" and job["resumable"] is True and job["error"] is None
        stopped_at = job["step"]
        assert 2 <= stopped_at < LONG
        assert [c["step"] for c in client.get(f"/api/jobs/{jid}/checkpoints").json()["checkpoints"]] == [stopped_at]

        job = client.post(f"/api/jobs/{jid}/resume").json()["job"]
        assert job["status"] == "queued"
        until(lambda: job_of(client, jid)["step"] >= stopped_at + 2)
    # the server stopped: the run was sent SIGTERM, saved and stopped
    with TestClient(create_app(workspace, start_runner=True), base_url=BASE) as client:
        job = job_of(client, jid)
        assert job["status"] == "interrupted" and job["resumable"] is True
        interrupted_at = job["step"]
        assert stopped_at < interrupted_at < LONG
        assert checkpoint_steps(job["run_dir"])[-1][0] == interrupted_at

        client.post(f"/api/jobs/{jid}/resume")
        until(lambda: job_of(client, jid)["status"] not in ("queued", "running"), every=0.2)
        job = job_of(client, jid)
        assert job["status"] == "completed" and job["step"] == LONG
        events = client.get(f"/api/jobs/{jid}/events").json()["events"]
        starts = [e for e in events if e["event"] == "start"]
        assert [e["start_step"] for e in starts] == [0, stopped_at, interrupted_at]
        assert [e["reason"] for e in events if e["event"] == "stopped"] == ["SIGTERM", "SIGTERM"]
        log = client.get(f"/api/jobs/{jid}/log", params={"tail": 10_000}).json()["lines"]
        assert sum(line.startswith(f"--- conjure ui: job {jid} resuming") for line in log) == 2


@pytest.mark.slow
def test_server_restarts(workspace, make_config):
    """Restart 1: the running job's process lives on and is adopted (followed by polling), the queued one stays
    queued. Restart 2: the run was killed meanwhile: interrupted, resumable. Then the queued job runs, and the
    interrupted one resumes to the end."""
    first = JobQueue(workspace, poll_seconds=0.05)
    job = submit(first, workspace, long_config(make_config, save_every_n_steps=2))
    waiting = submit(first, workspace, make_config())
    until(lambda: first.get(job.id).step >= 1, step=first.run_once)
    pid = first.get(job.id).pid
    first.close()  # the server goes away; its run goes on

    second = JobQueue(workspace, poll_seconds=0.05)
    assert second.run_once()
    assert second.get(job.id).status == "running" and second.get(job.id).pid == pid  # adopted ...
    seen = second.get(job.id).step
    until(lambda: second.get(job.id).step > seen and checkpoint_steps(job_dir(second, job)), step=second.run_once)
    assert second.get(waiting.id).status == "queued"  # ... and followed, one run at a time
    second.close()
    os.kill(pid, signal.SIGKILL)  # the run dies while no server watches (a reboot, the OOM killer)
    # SIGKILL is not death yet: a process that has torch mapped takes a while to exit on a busy machine
    until(lambda: not same_process(pid, workspace.jobs / str(job.id) / "config.yaml"))

    third = JobQueue(workspace, poll_seconds=0.05)
    assert third.run_once()  # the queued job starts
    killed = third.get(job.id)
    assert killed.status == "interrupted" and killed.resumable and killed.pid is None and killed.ended
    assert killed.error is None and checkpoint_steps(killed.run_dir)[-1][0] >= 2
    assert third.get(waiting.id).status == "running"
    third.resume(job.id)
    third.wait_idle(timeout=90)
    done, after = third.get(job.id), third.get(waiting.id)
    assert after.status == "completed" and after.step == 6
    assert done.status == "completed" and done.step == LONG and done.started >= after.ended
    third.close()


def job_dir(queue, job):
    return queue.get(job.id).run_dir


@pytest.mark.slow  # ~30 s: two training processes, each importing torch, diffusers and transformers
def test_a_job_of_two_processes_is_followed_and_cancelled_with_a_checkpoint(workspace, make_config):
    """A job of 2 processes runs `conjure train --num-processes 2`: the monitor follows the main process's events
    (each step once), and Cancel (SIGTERM to the launcher) stops both after one step with one checkpoint, as a
    cancel (not a failed rank)."""
    raw = long_config(make_config)
    raw["data"]["batch_size"], raw["advanced"] = 1, {"cpu": True}
    with TestClient(create_app(workspace, start_runner=True), base_url=BASE) as client:
        job = client.post("/api/jobs", json={"config": raw, "processes": 2}).json()["job"]
        jid = job["id"]
        assert job["processes"] == 2
        until(lambda: job_of(client, jid)["step"] >= 2, timeout=180)
        client.post(f"/api/jobs/{jid}/cancel")
        until(lambda: job_of(client, jid)["status"] != "running", timeout=120)
        job = job_of(client, jid)
        assert job["status"] == "cancelled" and job["error"] is None, job
        stopped_at = job["step"]
        assert [c["step"] for c in client.get(f"/api/jobs/{jid}/checkpoints").json()["checkpoints"]] == [stopped_at]
        events = client.get(f"/api/jobs/{jid}/events").json()["events"]
        (start,) = [e for e in events if e["event"] == "start"]
        assert (start["processes"], start["global_batch_size"]) == (2, 2)
        assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, stopped_at + 1))
        assert [e["status"] for e in events if e["event"] == "end"] == ["interrupted"]
        log = client.get(f"/api/jobs/{jid}/log", params={"tail": 10_000}).json()["lines"]
        assert f"continue with: conjure train --resume {job['run_dir']} --num-processes 2" in log


def test_a_job_takes_its_number_of_processes(workspace, make_config):
    """`processes` is the job's (default 1; 1 to 64), kept in a workspace whose jobs table predates it."""
    import sqlite3

    with sqlite3.connect(workspace.db_path) as db:  # a jobs table as workspaces made before the column
        db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, status TEXT NOT NULL, type TEXT NOT "
                   "NULL, config TEXT NOT NULL, run_name TEXT NOT NULL, output_dir TEXT NOT NULL, run_dir TEXT, "
                   "created TEXT NOT NULL, queued TEXT NOT NULL, started TEXT, ended TEXT, step INTEGER NOT NULL "
                   "DEFAULT 0, max_steps INTEGER, loss REAL, eta_seconds REAL, error TEXT, resume INTEGER NOT NULL "
                   "DEFAULT 0, pid INTEGER, stopping INTEGER NOT NULL DEFAULT 0, events_offset INTEGER NOT NULL "
                   "DEFAULT 0)")
    with TestClient(create_app(workspace, start_runner=False), base_url=BASE) as client:
        assert client.post("/api/jobs", json={"config": make_config()}).json()["job"]["processes"] == 1
        assert client.post("/api/jobs", json={"config": make_config(), "processes": 3}).json()["job"]["processes"] == 3
        refused = client.post("/api/jobs", json={"config": make_config(), "processes": 0})
        assert refused.status_code == 400 and "processes" in refused.json()["error"]
