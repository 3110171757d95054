"""The training tab's API (docs/ui.md, conjure.ui.training and conjure.ui.monitor) without running anything:
methods, config forms, saved configs, the job records, and a run folder's events, log, validation images,
checkpoints and export (read from a run folder laid out as a run leaves it). Real runs: tests/ui/test_jobs.py."""

import json

import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image

from conjure.config import CONFIG_TYPES
from conjure.ui.app import create_app
from conjure.ui.queue import checkpoint_steps

BASE = "http://127.0.0.1:7860"


@pytest.fixture
def app(tmp_path):
    return create_app(tmp_path / "workspace", start_runner=False)


@pytest.fixture
def client(app):
    return TestClient(app, base_url=BASE)


@pytest.fixture
def ws(app):
    return app.state.workspace


def config(**sections):
    """A valid textual_inversion config (nothing here runs it)."""
    data = {
        "type": "textual_inversion",
        "basic": {"base_model": "/models/sd15", "max_train_steps": 6},
        "data": {"source": "data/images"},  # in the workspace: a web job reads data there or in opened folders
        "textual_inversion": {"placeholder_token": "<zq-thing>", "initializer": "dog"},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def fields(answer):
    return {e["field"]: e["message"] for e in answer["errors"]}


# --- methods and config forms ------------------------------------------------------------------------


def test_methods_list_every_config_type(client):
    methods = client.get("/api/methods").json()["methods"]
    assert [m["type"] for m in methods] == list(CONFIG_TYPES)
    by_type = {m["type"]: m for m in methods}
    assert list(by_type) == ["textual_inversion", "lora", "pivotal", "finetune"]
    # basic.family picks one (auto: the model); FLUX.1 trains LoRAs only
    assert {t: m["families"] for t, m in by_type.items()} == {
        "textual_inversion": ["sd1", "sd2", "sdxl"], "lora": ["sd1", "sd2", "sdxl", "flux"],
        "pivotal": ["sd1", "sd2", "sdxl"], "finetune": ["sd1", "sd2", "sdxl"]}
    assert by_type["lora"]["title"].startswith("LoRA / DoRA: a concept model")


def test_schema(client):
    schema = client.get("/api/config/schema", params={"type": "lora"}).json()
    assert {"basic", "data", "lora", "optimizer"} <= set(schema["properties"])
    basic = schema["$defs"]["BasicConfig"]["properties"]
    assert basic["save_every_n_steps"]["default"] == 100 and basic["save_every_n_steps"]["description"]
    answer = client.get("/api/config/schema", params={"type": "lorra"})
    assert answer.status_code == 400 and "did you mean 'lora'" in answer.json()["error"]
    assert client.get("/api/config/schema", params={"type": "sdxl_lora"}).json() == schema  # a version 1 name
    answer = client.get("/api/config/schema")
    assert answer.status_code == 400 and answer.json()["error"] == "type: Field required"


def test_new_config_is_the_starter_with_the_workspace_runs(client, ws):
    answer = client.post("/api/config/new", json={"type": "lora"}).json()
    cfg = answer["config"]
    assert cfg["type"] == "lora" and cfg["version"] == 2 and cfg["basic"]["output_dir"] == str(ws.runs)
    assert cfg["basic"]["base_model"] == "path/to/model" and cfg["data"]["source"] == "path/to/images"
    assert client.post("/api/config/validate", json={"config": cfg}).json()["ok"]
    answer = client.post("/api/config/new", json={"type": "nope"})
    assert answer.status_code == 400 and "unknown config type 'nope'" in answer.json()["error"]
    assert client.post("/api/config/new", json={}).status_code == 400


def test_validate_resolves_a_valid_config(client, ws):
    answer = client.post("/api/config/validate", json={"config": config()}).json()
    assert answer["ok"] and answer["errors"] == []
    resolved = answer["config"]
    assert resolved["basic"]["output_dir"] == str(ws.runs)  # the default `runs`, inside the workspace
    assert resolved["data"]["batch_size"] == 4 and resolved["validation"]["seeds"] == [0, 1]  # defaults filled in
    nested = client.post("/api/config/validate", json={"config": config(basic={"output_dir": "mine/runs"})}).json()
    assert nested["config"]["basic"]["output_dir"] == str(ws.root / "mine" / "runs")


def test_validate_lists_every_problem_by_field(client):
    bad = config(basic={"base_modle": "x", "max_train_steps": 0}, data={"sources": [{"repeats": 2}]})
    bad["textual_inversion"]["placeholder_token"] = "two words"
    answer = client.post("/api/config/validate", json={"config": bad}).json()
    assert answer["ok"] is False and answer["config"] is None
    errors = fields(answer)
    assert errors["basic.base_modle"] == "unknown key (did you mean 'base_model'?)"
    assert errors["basic.max_train_steps"].startswith("Input should be greater than or equal to 1")
    assert errors["data.sources.0.path"] == "required, but missing"
    assert "one word" in errors["textual_inversion.placeholder_token"]
    # a rule spanning fields names its field itself
    answer = client.post("/api/config/validate", json={"config": config(data={"source": None})}).json()
    assert fields(answer)["data.source"].startswith("required")
    answer = client.post("/api/config/validate", json={"config": {"basic": {}}}).json()
    assert fields(answer)["type"].startswith("missing; set it to one of")


def test_validate_applies_the_web_apps_rules(client, tmp_path):
    answer = client.post("/api/config/validate", json={"config": config(basic={"output_dir": str(tmp_path / "x")})})
    assert "writes only inside its workspace" in fields(answer.json())["basic.output_dir"]
    answer = client.post("/api/config/validate", json={"config": config(basic={"output_dir": "../escape"})})
    assert "basic.output_dir" in fields(answer.json())
    answer = client.post("/api/config/validate", json={"config": config(basic={"resume": "latest"})})
    assert "resume it from the jobs list" in fields(answer.json())["basic.resume"]
    for name in ("../out", "a/b", ".."):
        answer = client.post("/api/config/validate", json={"config": config(basic={"run_name": name})})
        assert "folder name" in fields(answer.json())["basic.run_name"]


def test_validate_refuses_a_body_without_a_config(client):
    answer = client.post("/api/config/validate", json={"config": [1, 2]})
    assert answer.status_code == 400 and answer.json()["error"].startswith("config:")
    answer = client.post("/api/config/validate", content=b"not json", headers={"content-type": "application/json"})
    assert answer.status_code == 400 and answer.json() == {"error": "the request body is not valid JSON"}


def test_yaml_both_ways(client, ws):
    text = client.post("/api/config/to-yaml", json={"config": config()}).json()
    assert text["errors"] == []
    full = yaml.safe_load(text["yaml"])
    assert full["basic"]["save_every_n_steps"] == 100  # every default written out
    back = client.post("/api/config/from-yaml", json={"yaml": text["yaml"]}).json()
    assert back["errors"] == [] and back["config"]["textual_inversion"] == full["textual_inversion"]
    assert back["config"]["basic"]["output_dir"] == str(ws.runs)
    # a half-filled form still becomes YAML, with its problems
    half = {"type": "textual_inversion", "basic": {"base_model": "m"}}
    answer = client.post("/api/config/to-yaml", json={"config": half}).json()
    assert yaml.safe_load(answer["yaml"]) == half and "data" in fields(answer)


def test_from_yaml_problems(client):
    broken = client.post("/api/config/from-yaml", json={"yaml": "type: lora\nbasic: [1,\n"}).json()
    assert broken["config"] is None and broken["errors"][0]["message"].startswith("invalid YAML at line")
    listed = client.post("/api/config/from-yaml", json={"yaml": "- a\n- b\n"}).json()
    assert listed["config"] is None and "mapping" in listed["errors"][0]["message"]
    empty = client.post("/api/config/from-yaml", json={"yaml": ""}).json()
    assert empty["config"] is None and "empty" in empty["errors"][0]["message"]
    # an invalid config comes back as written, so the form can show it next to its errors
    invalid = client.post("/api/config/from-yaml", json={"yaml": "type: lora\nbasic: {seed: 1}\n"}).json()
    assert invalid["config"] == {"type": "lora", "basic": {"seed": 1}}
    assert fields(invalid)["basic.base_model"] == "required, but missing"
    # a rule spanning fields comes with the field it is about (ConfigError.problems: nothing parses its text)
    crossed = client.post("/api/config/validate", json={"config": config(
        data={"cache_latents": "memory", "center_crop": False}, basic={"max_train_epochs": 2})}).json()
    assert set(fields(crossed)) == {"basic", "data.cache_latents"}
    assert fields(crossed)["basic"].startswith("set exactly one of basic.max_train_steps")


def test_a_version_1_config_comes_back_in_the_current_form(client):
    old = yaml.safe_dump({**config(), "type": "sdxl_textual_inversion"})
    answer = client.post("/api/config/from-yaml", json={"yaml": old}).json()
    assert answer["errors"] == []
    got = answer["config"]
    assert (got["type"], got["version"], got["basic"]["family"]) == ("textual_inversion", 2, "sdxl")


def test_saved_configs(client, ws):
    assert client.get("/api/configs").json() == {"configs": []}
    text = yaml.safe_dump(config())
    assert client.put("/api/configs/my-style_v1.2", json={"yaml": text}).json() == {"name": "my-style_v1.2"}
    assert (ws.configs / "my-style_v1.2.yaml").read_text() == text
    assert client.put("/api/configs/draft.yaml", json={"yaml": "type: lora\n"}).json() == {"name": "draft"}
    assert client.get("/api/configs").json() == {"configs": ["draft", "my-style_v1.2"]}
    saved = client.get("/api/configs/my-style_v1.2").json()
    assert saved["name"] == "my-style_v1.2" and saved["yaml"] == text and saved["errors"] == []
    assert saved["config"]["textual_inversion"]["placeholder_token"] == "<zq-thing>"
    draft = client.get("/api/configs/draft").json()
    assert draft["config"] == {"type": "lora"} and draft["errors"]
    # replacing one
    client.put("/api/configs/draft", json={"yaml": text})
    assert client.get("/api/configs/draft").json()["yaml"] == text


@pytest.mark.parametrize("name", [".hidden", "a b", "x;rm", "..", "a" * 101, "%2e%2e"])
def test_saved_config_names_are_safe(client, ws, name):
    answer = client.put(f"/api/configs/{name}", json={"yaml": "type: lora\n"})
    assert answer.status_code in (400, 403, 404)  # 404: the client resolved `..` before sending it
    assert [p for p in ws.root.rglob("*.yaml")] == []


def test_saved_config_errors(client):
    answer = client.get("/api/configs/missing")
    assert answer.status_code == 404 and "missing" in answer.json()["error"]
    answer = client.put("/api/configs/x", json={"yaml": "a: [1,\n"})
    assert answer.status_code == 400 and "invalid YAML" in answer.json()["error"]
    answer = client.put("/api/configs/x", json={"yaml": "just text"})
    assert answer.status_code == 400 and "mapping" in answer.json()["error"]


# --- jobs --------------------------------------------------------------------------------------------


def test_submitted_jobs_are_queued(client, ws):
    first = client.post("/api/jobs", json={"config": config()}).json()["job"]
    assert first["status"] == "queued" and first["type"] == "textual_inversion"
    assert first["run_name"] == f"textual_inversion-{first['id']}" and first["run_dir"] is None
    assert first["max_steps"] == 6 and first["step"] == 0 and first["resumable"] is False
    assert first["created"] and first["started"] is None and first["ended"] is None
    second = client.post("/api/jobs", json={"yaml": yaml.safe_dump(config(basic={"run_name": "mine"}))}).json()["job"]
    assert second["run_name"] == "mine"
    listed = client.get("/api/jobs").json()["jobs"]
    assert [j["id"] for j in listed] == [second["id"], first["id"]]  # newest first
    assert client.get(f"/api/jobs/{first['id']}").json()["job"] == first
    assert set(first) == {"id", "status", "type", "run_name", "run_dir", "created", "started", "ended", "step",
                          "max_steps", "loss", "eta_seconds", "error", "resumable", "stopping", "processes"}


def test_invalid_jobs_are_refused_with_their_errors(client):
    answer = client.post("/api/jobs", json={"config": config(basic={"base_modle": "x"})})
    assert answer.status_code == 400
    assert answer.json()["error"] == "the config is not valid"
    assert fields(answer.json())["basic.base_modle"].startswith("unknown key")
    answer = client.post("/api/jobs", json={"yaml": "type: [\n"})
    assert answer.status_code == 400 and answer.json()["errors"][0]["message"].startswith("invalid YAML")
    answer = client.post("/api/jobs", json={"config": config(basic={"output_dir": "/elsewhere"})})
    assert answer.status_code == 400 and "basic.output_dir" in fields(answer.json())
    for body in ({}, {"yaml": "type: lora\n", "config": config()}):
        answer = client.post("/api/jobs", json=body)
        assert answer.status_code == 400 and "one of the two" in answer.json()["error"]
    assert client.get("/api/jobs").json() == {"jobs": []}


def test_unknown_jobs_are_404(client):
    for method, path in [("get", "/api/jobs/9"), ("post", "/api/jobs/9/cancel"), ("post", "/api/jobs/9/resume"),
                         ("get", "/api/jobs/9/events"), ("get", "/api/jobs/9/log"), ("get", "/api/jobs/9/validation"),
                         ("get", "/api/jobs/9/checkpoints"), ("get", "/api/jobs/9/score")]:
        answer = getattr(client, method)(path)
        assert answer.status_code == 404 and answer.json() == {"error": "no job 9"}, path
    answer = client.post("/api/jobs/9/export", json={"step": 1, "to": "/tmp/x"})
    assert answer.status_code == 404
    assert client.get("/api/jobs/abc").status_code == 400


def test_cancel_a_queued_job(client):
    job = client.post("/api/jobs", json={"config": config()}).json()["job"]
    cancelled = client.post(f"/api/jobs/{job['id']}/cancel").json()["job"]
    assert cancelled["status"] == "cancelled" and cancelled["ended"] and cancelled["resumable"] is False
    again = client.post(f"/api/jobs/{job['id']}/cancel")
    assert again.status_code == 400 and "is cancelled" in again.json()["error"]
    answer = client.post(f"/api/jobs/{job['id']}/resume")
    assert answer.status_code == 400 and "no checkpoint" in answer.json()["error"]


def test_a_job_that_has_not_run_shows_nothing(client):
    job = client.post("/api/jobs", json={"config": config()}).json()["job"]
    jid = job["id"]
    assert client.get(f"/api/jobs/{jid}/events").json() == {"events": [], "next": 0}
    assert client.get(f"/api/jobs/{jid}/log").json() == {"lines": []}
    assert client.get(f"/api/jobs/{jid}/validation").json() == {"prompts": [], "seeds": [], "steps": []}
    assert client.get(f"/api/jobs/{jid}/checkpoints").json() == {"checkpoints": []}
    assert client.get(f"/api/jobs/{jid}/score").json() == {"rows": [], "suggestion": None}
    answer = client.post(f"/api/jobs/{jid}/export", json={"step": "latest", "to": "/tmp/x"})
    assert answer.status_code == 400 and "has not run" in answer.json()["error"]
    answer = client.post(f"/api/jobs/{jid}/resume")
    assert answer.status_code == 400 and "is queued" in answer.json()["error"]


# --- a run's folder, as a run leaves it ----------------------------------------------------------------


@pytest.fixture
def stopped_job(app, client, ws):
    """A job whose run stopped at step 4 (interrupted), with checkpoints at 2 and 4 and validation at 0 and 2."""
    job = client.post("/api/jobs", json={"config": config()}).json()["job"]
    run = ws.runs / job["run_name"]
    prompts, seeds = ["a photo of <zq-thing>", "a <zq-thing> on a table"], [7, 3]
    events = [{"event": "start", "max_train_steps": 6, "start_step": 0}]
    for step in (0, 2):
        folder = run / "validation" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        images = []
        for p in range(2):
            for seed in seeds:
                (folder / f"{p:02d}-seed{seed}.png").write_bytes(b"png")
                images.append(str(folder / f"{p:02d}-seed{seed}.png"))
        (folder / "grid.png").write_bytes(b"grid")
        events.append({"event": "validation", "step": step, "images": images, "prompts": prompts, "seeds": seeds})
        events += [{"event": "step", "step": s, "loss": 0.5} for s in (step + 1, step + 2)]
    for step in (2, 4):
        folder = run / "checkpoints" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "zq-thing.safetensors").write_bytes(f"weights {step}".encode())
        (folder / "training_state.pt").write_bytes(b"state")
    (run / "checkpoints" / ".tmp-step-000006").mkdir()  # a checkpoint being written: not listed
    # a line cut off by a kill and continued by the next run's first event; then one being written
    lines = [json.dumps(e) for e in events] + ['{"event": "step", "st{"event": "start"}', '{"event": "end", "stat']
    (run / "events.jsonl").write_text("\n".join(lines))
    log = ws.jobs / str(job["id"]) / "log.txt"
    log.parent.mkdir(parents=True)
    log.write_text("loading\n  0%|   | 0/6\r 17%|#  | 1/6\r 67%|#### | 4/6 [loss=0.5]\nstopped at step 4\n")
    app.state.jobs._update(job["id"], status="interrupted", run_dir=str(run), step=4)
    return job["id"], run


def test_events_are_read_from_a_byte_cursor(client, stopped_job):
    jid, run = stopped_job
    data = (run / "events.jsonl").read_bytes()
    line_starts = [0] + [i + 1 for i, byte in enumerate(data) if byte == ord("\n")]
    everything = client.get(f"/api/jobs/{jid}/events").json()
    # 8 complete lines, one of them garbled (read, not returned); the last line is not complete yet
    assert everything["next"] == line_starts[8] == data.rfind(b"\n") + 1 and len(everything["events"]) == 7
    assert [e["event"] for e in everything["events"][:2]] == ["start", "validation"]
    later = client.get(f"/api/jobs/{jid}/events", params={"after": line_starts[5]}).json()
    assert later == {"events": everything["events"][5:], "next": line_starts[8]}
    # a cursor inside a line reads from the next line
    assert client.get(f"/api/jobs/{jid}/events", params={"after": line_starts[5] - 3}).json() == later
    end = line_starts[8]
    assert client.get(f"/api/jobs/{jid}/events", params={"after": end}).json() == {"events": [], "next": end}
    assert client.get(f"/api/jobs/{jid}/events", params={"after": -1}).status_code == 400


def test_log_tail_shows_the_last_redraw_of_a_progress_bar(client, stopped_job):
    jid, _ = stopped_job
    assert client.get(f"/api/jobs/{jid}/log").json()["lines"] == [
        "loading", " 67%|#### | 4/6 [loss=0.5]", "stopped at step 4"]
    assert client.get(f"/api/jobs/{jid}/log", params={"tail": 1}).json()["lines"] == ["stopped at step 4"]
    assert client.get(f"/api/jobs/{jid}/log", params={"tail": 0}).json()["lines"] == []


def test_validation_gallery(client, stopped_job):
    jid, run = stopped_job
    gallery = client.get(f"/api/jobs/{jid}/validation").json()
    assert gallery["prompts"] == ["a photo of <zq-thing>", "a <zq-thing> on a table"] and gallery["seeds"] == [7, 3]
    assert [s["step"] for s in gallery["steps"]] == [0, 2]
    images = gallery["steps"][1]["images"]
    assert [(im["prompt_index"], im["seed"]) for im in images] == [(0, 7), (0, 3), (1, 7), (1, 3)]
    answer = client.get(images[1]["url"])
    assert answer.status_code == 200 and answer.content == b"png"
    assert images[1]["url"].endswith("/validation/step-000002/00-seed3.png")
    assert client.get(gallery["steps"][0]["grid"]).content == b"grid"


def test_score_gives_the_rows_and_the_suggested_step(client, stopped_job):
    jid, run = stopped_job
    before = client.get(f"/api/jobs/{jid}/score").json()
    assert [r["step"] for r in before["rows"]] == [2, 4]  # the checkpoints, no figures yet
    assert before["suggestion"]["step"] is None and "validation.holdout" in before["suggestion"]["reason"]
    figures = [{"event": "validation_loss", "step": s, "loss": v, "bands": {}, "images": 2}
               for s, v in ((0, 1.0), (2, 0.5), (4, 0.9))]
    figures.append({"event": "image_scores", "step": 2, "fidelity": 0.8, "alignment": 0.3, "model": "tiny"})
    with (run / "events.jsonl").open("a") as events:  # after the line being written, now cut off for good
        events.write("\n" + "".join(json.dumps(e) + "\n" for e in figures))
    after = client.get(f"/api/jobs/{jid}/score").json()
    assert after["suggestion"]["step"] == 2 and after["suggestion"]["rule"].startswith("the earliest")
    assert after["rows"][1] == {"step": 2, "val_loss": 0.5, "bands": {}, "fidelity": 0.8, "alignment": 0.3,
                                "checkpoint": str(run / "checkpoints" / "step-000002")}


def test_checkpoints_and_export(client, stopped_job, tmp_path):
    jid, run = stopped_job
    listed = client.get(f"/api/jobs/{jid}/checkpoints").json()["checkpoints"]
    assert listed == [
        {"step": 2, "path": str(run / "checkpoints" / "step-000002"), "files": ["zq-thing.safetensors"]},
        {"step": 4, "path": str(run / "checkpoints" / "step-000004"), "files": ["zq-thing.safetensors"]},
    ]
    assert [s for s, _ in checkpoint_steps(run)] == [2, 4]
    out = tmp_path / "app" / "embeddings"
    answer = client.post(f"/api/jobs/{jid}/export", json={"step": "latest", "to": str(out)}).json()
    assert answer == {"files": [str(out / "zq-thing.safetensors")]}
    assert (out / "zq-thing.safetensors").read_bytes() == b"weights 4"
    answer = client.post(f"/api/jobs/{jid}/export", json={"step": 2, "to": str(out)})
    assert answer.status_code == 400 and "exists" in answer.json()["error"]
    client.post(f"/api/jobs/{jid}/export", json={"step": 2, "to": str(out), "force": True})
    assert (out / "zq-thing.safetensors").read_bytes() == b"weights 2"
    answer = client.post(f"/api/jobs/{jid}/export", json={"step": 2, "to": str(out), "name": "best"}).json()
    assert answer == {"files": [str(out / "best.safetensors")]}


@pytest.mark.parametrize("body, message", [
    ({"step": 3, "to": "/tmp/x"}, "no checkpoint at step 3"),
    ({"step": "first", "to": "/tmp/x"}, "step"),
    ({"step": 2, "to": "relative/folder"}, "full path"),
    ({"step": 2, "to": "/tmp/x", "name": "../up"}, "name"),
    ({"step": 2, "to": "/tmp/x", "name": ".hidden"}, "name"),
    ({"step": 2}, "to: Field required"),
])
def test_export_refusals(client, stopped_job, body, message):
    jid, _ = stopped_job
    answer = client.post(f"/api/jobs/{jid}/export", json=body)
    assert answer.status_code == 400 and message in answer.json()["error"]


def test_export_to_a_folder_that_cannot_be_made(client, stopped_job, tmp_path):
    jid, _ = stopped_job
    (tmp_path / "file").write_text("")
    answer = client.post(f"/api/jobs/{jid}/export", json={"step": 2, "to": str(tmp_path / "file" / "sub")})
    assert answer.status_code == 400 and "cannot write to" in answer.json()["error"]


def test_resume_queues_a_stopped_job_again(client, stopped_job):
    jid, run = stopped_job
    before = client.get(f"/api/jobs/{jid}").json()["job"]
    assert before["resumable"] is True
    job = client.post(f"/api/jobs/{jid}/resume").json()["job"]
    assert job["status"] == "queued" and job["run_dir"] == str(run) and job["step"] == 4
    assert job["ended"] is None and job["resumable"] is False
    answer = client.post(f"/api/jobs/{jid}/resume")
    assert answer.status_code == 400 and "is queued" in answer.json()["error"]


# --- files ---------------------------------------------------------------------------------------------


def test_files_are_served_only_through_the_gate(client, ws, tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(ws.root / "note.png")
    answer = client.get("/api/files", params={"path": str(ws.root / "note.png")})
    assert answer.status_code == 200 and answer.content == (ws.root / "note.png").read_bytes()
    (ws.root / "note.txt").write_text("hello")  # inside, but not an image: not for pages
    assert client.get("/api/files", params={"path": str(ws.root / "note.txt")}).status_code == 403
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    answer = client.get("/api/files", params={"path": str(tmp_path / "secret.png")})
    assert answer.status_code == 403 and answer.json() == {"error": "path refused"}
    answer = client.get("/api/files", params={"path": str(ws.root / ".." / "secret.png")})
    assert answer.status_code == 403
    assert client.get("/api/files", params={"path": str(ws.root / "missing.png")}).status_code == 404
    assert client.get("/api/files", params={"path": str(ws.runs)}).status_code == 403  # a folder, not an image
    assert client.get("/api/files").status_code == 400


# --- hostile YAML and bodies (issue 21, D7 and D15) ------------------------------------------------------


def _alias_bomb() -> str:
    """7 levels of 9 aliases (4.8 million strings, a 24 MB answer): past the bound, yet small enough not to
    hurt the machine when the bound is missing; the review's 9 levels are the same refusal."""
    lines = ["type: textual_inversion", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 7)]
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_everywhere_yaml_is_read(client, ws):
    """A 418-byte YAML once made from-yaml answer 1.85 GB in 21 s (5.7 GB of server memory)."""
    answer = client.post("/api/config/from-yaml", json={"yaml": _alias_bomb()})
    assert answer.status_code == 200 and len(answer.content) < 2000
    assert answer.json()["config"] is None and "too large once its aliases" in answer.json()["errors"][0]["message"]
    answer = client.put("/api/configs/bomb", json={"yaml": _alias_bomb()})
    assert answer.status_code == 400 and "too large once its aliases" in answer.json()["error"]
    (ws.configs / "bomb.yaml").write_text(_alias_bomb())  # saved by an older version, or by hand
    answer = client.get("/api/configs/bomb")
    assert answer.status_code == 200 and len(answer.content) < 4000 and answer.json()["config"] is None
    answer = client.post("/api/jobs", json={"yaml": _alias_bomb()})
    assert answer.status_code == 400 and len(answer.content) < 2000


def test_duplicate_keys_are_named_with_their_line(client):
    text = "type: textual_inversion\nbasic:\n  seed: 1\n  seed: 2\n"
    answer = client.post("/api/config/from-yaml", json={"yaml": text}).json()
    assert answer["config"] is None
    assert answer["errors"] == [{"field": "", "message":
                                 "invalid YAML at line 4, column 3: duplicate key 'seed' (first on line 3)"}]
    assert client.post("/api/jobs", json={"yaml": text}).status_code == 400


def test_request_bodies_are_bounded(client):
    from conjure.ui.app import MAX_BODY_BYTES

    answer = client.post("/api/config/from-yaml", json={"yaml": "x" * (MAX_BODY_BYTES + 1)})
    assert answer.status_code == 413 and "request too large" in answer.json()["error"]
    chunks = iter([b'{"yaml": "', b"type: lora", b'"}'])
    answer = client.post("/api/config/from-yaml", content=chunks, headers={"Content-Type": "application/json"})
    assert answer.status_code == 411
    assert client.post("/api/config/from-yaml", json={"yaml": "type: lora\n"}).status_code == 200


# --- every path of a job's config passes the gate (issue 21, D9) -------------------------------------------


def test_every_output_folder_must_lie_in_the_workspace(client, ws, tmp_path):
    """A job's data.cache_dir once wrote a latent cache outside the workspace (output_dir alone was checked)."""
    outside = tmp_path / "outside"
    (ws.root / "out-link").symlink_to(outside, target_is_directory=True)
    for cache_dir in (str(outside / "cache_escape"), "../cache_escape", "out-link/cache", "~/cache_escape"):
        raw = config(data={"cache_latents": "disk", "cache_dir": cache_dir})
        answer = client.post("/api/config/validate", json={"config": raw}).json()
        assert "writes only inside its workspace" in fields(answer)["data.cache_dir"], cache_dir
        answer = client.post("/api/jobs", json={"config": raw})
        assert answer.status_code == 400 and "data.cache_dir" in fields(answer.json()), cache_dir
    assert not outside.exists()
    answer = client.post("/api/config/validate", json={"config": config(data={"cache_dir": "caches/latents"})}).json()
    assert answer["ok"] and answer["config"]["data"]["cache_dir"] == str(ws.root / "caches" / "latents")


def test_data_sources_must_be_opened_and_models_may_be_anywhere(client, ws, tmp_path):
    folder, unopened = tmp_path / "set", tmp_path / "unopened"
    for made in (folder, unopened):
        made.mkdir()
        Image.new("RGB", (8, 8)).save(made / "a.png")
    sources = [{"path": str(folder)}, {"path": str(unopened)}, {"path": "hf:owner/name"}, {"path": "mine"}]
    raw = config(data={"source": None, "sources": sources})
    answer = client.post("/api/config/validate", json={"config": raw}).json()
    assert set(fields(answer)) == {"data.sources.0.path", "data.sources.1.path"}
    assert "open this folder there first" in fields(answer)["data.sources.1.path"]
    assert client.post("/api/datasets/open", json={"path": str(folder)}).status_code == 200
    answer = client.post("/api/config/validate", json={"config": raw}).json()
    assert set(fields(answer)) == {"data.sources.1.path"}
    assert "data.source" in fields(client.post("/api/config/validate", json={"config": config(
        data={"source": str(unopened / "a.jsonl")})}).json())
    # a model is only read: any folder, file or hub id (docs/ui.md)
    models = {"base_model": str(unopened / "model.safetensors"), "vae": str(unopened / "vae"),
              "base_model_config": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    assert client.post("/api/config/validate", json={"config": config(basic=models)}).json()["ok"]


NOT_PATHS = {
    "basic.revision", "basic.variant", "basic.run_name", "data.caption_prefix", "data.shuffle_caption_delimiter",
    "data.sources.caption", "validation.prompts", "validation.negative_prompt", "textual_inversion.placeholder_token",
    "textual_inversion.initializer", "textual_inversion.replace_word", "lora.output_name", "lora.trigger_word",
    "finetune.output_name", "validation.class_word", "export.description",
}
"""String fields that name no file or folder (run_name and output_name are names, checked on their own)."""


def _string_fields(model, prefix=""):
    import typing

    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        kinds = [field.annotation]
        while any(typing.get_args(kind) for kind in kinds):
            kinds = [arg for kind in kinds for arg in (typing.get_args(kind) or (kind,))
                     if typing.get_origin(kind) is not typing.Literal]
        for kind in kinds:
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from _string_fields(kind, f"{prefix}{name}.")
            elif kind is str:
                yield f"{prefix}{name}", field


def test_every_string_field_is_a_path_with_a_role_or_known_not_to_be_one():
    """So that a path field added later (basic.vae was) cannot bypass the web app's gate unnoticed: give it
    json_schema_extra={"path": ROLE} (conjure.config.sections) or, if it names no file, add it above."""
    from conjure.config import CONFIG_TYPES

    unclassified = set()
    for cls in CONFIG_TYPES.values():
        for dotted, field in _string_fields(cls):
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if extra.get("path") not in ("model", "data", "output", "run") and dotted not in NOT_PATHS:
                unclassified.add(dotted)
    assert not unclassified, f"string fields without a path role: {sorted(unclassified)}"


@pytest.mark.parametrize("job_id", ["99999999999999999999999", str(2**63), "0", "-1"])
def test_job_ids_beyond_sqlite_are_no_job(client, job_id):
    """issue 21, D15: a 23-digit id answered 500 (OverflowError in SQLite's binding)."""
    for method, path in (("GET", ""), ("GET", "/events"), ("GET", "/log"), ("GET", "/validation"),
                         ("GET", "/checkpoints"), ("POST", "/cancel"), ("POST", "/resume")):
        answer = client.request(method, f"/api/jobs/{job_id}{path}")
        assert answer.status_code == 404 and answer.json() == {"error": f"no job {int(job_id)}"}, (path, answer.text)
    answer = client.post(f"/api/jobs/{job_id}/export", json={"step": "latest", "to": "/tmp/x"})
    assert answer.status_code == 404


def test_the_form_round_trip_leaves_a_memory_presets_machine_options_to_the_run(client):
    """basic.memory_preset sets 8-bit AdamW where the run's machine has it (conjure.config.presets): the form's
    data and the YAML it launches leave the unset option out, or it would be the user's 'adamw'."""
    text = client.post("/api/config/to-yaml", json={"config": config(basic={"memory_preset": "low_memory"})}).json()
    assert "optimizer" not in yaml.safe_load(text["yaml"])["optimizer"]
    back = client.post("/api/config/from-yaml", json={"yaml": text["yaml"]}).json()
    assert back["errors"] == [] and "optimizer" not in back["config"]["optimizer"]
    # set by the preset when validated: shown apart from the form's config, which leaves it to the preset
    assert back["preset"]["advanced.gradient_checkpointing"] is True and "gradient_checkpointing" not in back["config"]["advanced"]
    mine = client.post("/api/config/from-yaml", json={"yaml": yaml.safe_dump(
        config(basic={"memory_preset": "low_memory"}, optimizer={"optimizer": "adamw"}))}).json()
    assert mine["config"]["optimizer"]["optimizer"] == "adamw"  # written by the user: kept


def real_app_files(run, step):
    """Replace the checkpoint's placeholder bytes with a real SD 1.x embedding file (app installs read its kind)."""
    import torch
    from safetensors.torch import save_file

    path = run / "checkpoints" / f"step-{step:06d}" / "zq-thing.safetensors"
    save_file({"emb_params": torch.full((1, 768), float(step))}, path)
    return path


@pytest.mark.parametrize("app_name, marker, folder, usage", [
    ("comfyui", "comfy", "models/embeddings", "in ComfyUI: type embedding:zq-thing in a prompt (CLIP Text Encode)"),
    ("a1111", "webui.py", "embeddings", "in AUTOMATIC1111/Forge: type zq-thing in the prompt"),
    ("invokeai", "invokeai.yaml", "conjure", "in InvokeAI: type <zq-thing> in the prompt"),
])
def test_export_into_an_app(client, stopped_job, tmp_path, app_name, marker, folder, usage):
    jid, run = stopped_job
    source = real_app_files(run, 4)
    app_dir = tmp_path / app_name
    (app_dir / marker).parent.mkdir(parents=True, exist_ok=True)
    (app_dir / marker).write_text("")
    answer = client.post(f"/api/jobs/{jid}/export", json={"step": 4, "to": str(app_dir), "app": app_name}).json()
    installed = app_dir / folder / "zq-thing.safetensors"
    assert answer["files"] == [str(installed)] and installed.read_bytes() == source.read_bytes()
    assert answer["usage"][0] == usage
    answer = client.post(f"/api/jobs/{jid}/export", json={"step": 4, "to": str(app_dir), "app": app_name})
    assert answer.status_code == 400 and "exists; overwrite it" in answer.json()["error"]


@pytest.mark.parametrize("body, message", [
    ({"step": 4, "to": "{tmp}", "app": "comfyui"}, "does not look like a ComfyUI folder"),
    ({"step": 4, "to": "{tmp}", "app": "krita"}, "app: one of invokeai, comfyui, a1111, not 'krita'"),
    ({"step": 4, "to": "relative/ComfyUI", "app": "comfyui"}, "full path"),
])
def test_export_into_an_app_refusals(client, stopped_job, tmp_path, body, message):
    jid, run = stopped_job
    real_app_files(run, 4)
    body = {**body, "to": body["to"].replace("{tmp}", str(tmp_path))}
    answer = client.post(f"/api/jobs/{jid}/export", json=body)
    assert answer.status_code == 400 and message in answer.json()["error"]
    assert not (tmp_path / "models").exists()


def test_choosing_another_preset_in_the_form_applies_its_options_after_a_yaml_round_trip(client):
    """Issue 16: the form's YAML and config leave out what basic.memory_preset filled (the answers say it apart, as
    `preset`), so that after a YAML round trip choosing another preset in the form still applies that one's
    options; an option the user set (in the form or the YAML) stays theirs."""
    text = client.post("/api/config/to-yaml", json={"config": config(basic={"memory_preset": "balanced"})}).json()
    written = yaml.safe_load(text["yaml"])
    assert "gradient_checkpointing" not in written["advanced"] and "cache_latents" not in written["data"]
    back = client.post("/api/config/from-yaml", json={"yaml": text["yaml"]}).json()
    assert back["errors"] == [] and "gradient_checkpointing" not in back["config"]["advanced"]
    assert back["preset"] == {"advanced.gradient_checkpointing": True, "data.cache_latents": "memory",
                              "data.cache_text_encoder_outputs": False}  # textual inversion trains the encoder
    form = back["config"]
    form["basic"]["memory_preset"] = "fast"  # chosen in the form
    answer = client.post("/api/config/validate", json={"config": form}).json()
    assert answer["ok"] and answer["preset"]["advanced.gradient_checkpointing"] is False
    again = client.post("/api/config/from-yaml", json={
        "yaml": client.post("/api/config/to-yaml", json={"config": form}).json()["yaml"]}).json()
    assert again["preset"]["advanced.gradient_checkpointing"] is False
    form["advanced"]["gradient_checkpointing"] = True  # edited in the form: the user's, whatever the preset
    form["basic"]["memory_preset"] = "balanced"
    answer = client.post("/api/config/validate", json={"config": form}).json()
    assert "advanced.gradient_checkpointing" not in answer["preset"]
    assert answer["config"]["advanced"]["gradient_checkpointing"] is True
    form["basic"]["memory_preset"] = "fast"
    mine = yaml.safe_load(client.post("/api/config/to-yaml", json={"config": form}).json()["yaml"])
    assert mine["advanced"]["gradient_checkpointing"] is True and mine["basic"]["memory_preset"] == "fast"
    unset = client.post("/api/config/validate", json={"config": config()}).json()
    assert unset["preset"] == {}  # no preset: nothing filled
