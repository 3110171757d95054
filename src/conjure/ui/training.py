"""Training tab and jobs API (prefix `/api`; the table in docs/ui.md): methods, config forms (schema, starter,
validation, YAML both ways), saved configs and the job queue (conjure.ui.queue, conjure.ui.runner); what a
job's run shows is conjure.ui.monitor's.

Configs go through conjure.config alone (one typed config is the source of every default and message); a
job's config is the user's with the web app's rules, checked like any field. Every path field is found by its
role (`json_schema_extra["path"]`, conjure.config.sections), so a new one cannot be left unchecked; relative
paths are taken from the workspace folder, the runs' working directory, and `~` is the user's home:
- "output" (`basic.output_dir`, `data.cache_dir`): must lie inside the workspace (the default `runs` is
  `<workspace>/runs/`), where the app can show a run; written into the job's config as real absolute paths;
- "data" (`data.source`, `data.sources[].path`): inside the workspace or a folder opened in the data-set tab,
  the same gate as every file endpoint (`hf:` hub data sets are not paths); the files a `.jsonl` lists are
  read where they are, as training reads them;
- "model" (`basic.base_model`, `base_model_config`, `vae`): read from anywhere, or a hub id: models live in
  the apps' folders, and are loaded, never served or written;
- "run" (`basic.resume`) must be empty: a job continues its own run with `POST /api/jobs/{id}/resume`;
- `basic.run_name`: a plain folder name, as the config itself requires (default `<type>-<id>`, conjure.ui.queue).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from conjure.config import CONFIG_TYPES, ConfigError, parse_config, starter_yaml
from conjure.config.loading import config_class, config_data, load_yaml, yaml_problem
from conjure.config.presets import preset_filled
from conjure.data.hf import HUB_PREFIX
from conjure.errors import ConjureError
from conjure.files import atomic_write_text
from conjure.ui.runner import JobQueue
from conjure.ui.workspace import NotFound, PathRefused, Workspace

SHUTDOWN_WAIT_SECONDS = 60.0
CONFIG_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


router = APIRouter(prefix="/api", tags=["training"])
_queue_lock = threading.Lock()


def jobs_of(app: Any) -> JobQueue:
    """The app's job queue (created on first use; `start_runner` also starts its runner)."""
    with _queue_lock:
        queue = getattr(app.state, "jobs", None)
        if queue is None:
            queue = app.state.jobs = JobQueue(app.state.workspace)
        return queue


def start_runner(app: Any) -> None:
    """Start the job runner thread for `app`; on shutdown the running job is stopped (SIGTERM: it saves a
    checkpoint) and recorded as interrupted."""
    queue = jobs_of(app)
    queue.start()
    app.router.on_shutdown.append(lambda: queue.shutdown(SHUTDOWN_WAIT_SECONDS))


def _ws(request: Request) -> Workspace:
    return request.app.state.workspace


def _jobs(request: Request) -> JobQueue:
    return jobs_of(request.app)


# --- configs -----------------------------------------------------------------------------------------


def config_errors(exc: ConfigError) -> list[dict[str, str]]:
    """A ConfigError's problems as [{"field": "data.source", "message": ...}] ("": the config as a whole)."""
    return [{"field": problem.field, "message": problem.message} for problem in exc.problems]


def check_config(ws: Workspace, data: Any) -> tuple[Any, list[dict[str, str]]]:
    """(config as a job would run it, []) or (None, errors): conjure.config's validation plus the web app's
    rules for output_dir and resume (module docstring)."""
    if not isinstance(data, dict):
        return None, [{"field": "", "message": f"a config is a mapping of sections, not a {type(data).__name__}"}]
    try:
        config = parse_config(data)
    except ConfigError as exc:
        return None, config_errors(exc)
    errors = []
    for section, name, dotted, role, value in path_fields(config):
        problem = _path_problem(ws, role, value)
        if isinstance(problem, Path):
            setattr(section, name, str(problem))  # an output folder as the run will use it: absolute, real
        elif problem:
            errors.append({"field": dotted, "message": problem})
    return (None, errors) if errors else (config, [])


def path_fields(model: BaseModel, prefix: str = "") -> Iterator[tuple[BaseModel, str, str, str, str]]:
    """(section, field name, dotted name, role, value) of every path a config sets: the fields whose
    `json_schema_extra["path"]` gives their role (conjure.config.sections), in sections and lists of them."""
    for name, field in type(model).model_fields.items():
        value, dotted = getattr(model, name), f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from path_fields(value, f"{dotted}.")
        for index, item in enumerate(value) if isinstance(value, list) else ():
            if isinstance(item, BaseModel):
                yield from path_fields(item, f"{dotted}.{index}.")
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if "path" in extra and isinstance(value, str):
            yield model, name, dotted, str(extra["path"]), value


def _path_problem(ws: Workspace, role: str, value: str) -> str | Path | None:
    """The web app's rule for one path of a job's config (module docstring): a message when it breaks it; for
    an output folder, its real path when it keeps it."""
    if role == "model":
        return None  # read from anywhere: models live in apps' folders, and are only loaded, never served
    if role == "run":
        return "must be empty for a job; to continue a stopped job, resume it from the jobs list"
    if not value or (role == "data" and value.startswith(HUB_PREFIX)):
        return None  # unset (the default applies), or a hub data set
    try:
        path = Path(value).expanduser()  # as training reads it: `~` is the user's home; relative: the workspace
        real = ws.resolve(str(path if path.is_absolute() else ws.root / path))
    except (PathRefused, RuntimeError):  # RuntimeError: `~name` of an unknown user
        real = None
    if role == "data":
        return None if real is not None else (
            "the web app reads data sets from its workspace and the folders opened in the data-set tab: open "
            "this folder there first (or one that holds it)")
    if real is None or not (real == ws.root or real.is_relative_to(ws.root)):
        return (f"the web app writes only inside its workspace ({ws.root}), where it can show runs; give a "
                "relative path (e.g. runs) or a folder inside it")
    return real


def _form_data(config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config for the form and its YAML, and what its memory preset filled in (dotted name -> value): the form
    shows those values but keeps them out of its config (and the machine options a preset leaves to the run's
    start, `config_data`), so that another preset chosen in the form applies its own (conjure.config.presets)."""
    data, filled = config_data(config), preset_filled(config)
    for option in filled:
        section, name = option.split(".")
        data[section].pop(name, None)
    return data, filled


def _yaml_mapping(text: str) -> tuple[dict[str, Any] | None, list[dict[str, str]]]:
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        where, problem = yaml_problem(exc)
        return None, [{"field": "", "message": f"invalid YAML{' at' + where if where else ''}: {problem}"}]
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        return None, [{"field": "", "message": f"a config is a mapping of sections; this YAML is {kind}"}]
    return data, []


def _from_yaml(ws: Workspace, text: str) -> dict[str, Any]:
    """{config for the form, what its memory preset filled, errors}: the resolved config when valid (`_form_data`),
    else the mapping as written (null when the text is not a YAML mapping)."""
    data, errors = _yaml_mapping(text)
    if data is None:
        return {"config": None, "preset": {}, "errors": errors}
    config, errors = check_config(ws, data)
    form, filled = _form_data(config) if config is not None else (data, {})
    return {"config": form, "preset": filled, "errors": errors}


class TypeBody(BaseModel):
    type: str = Field(description="A config type, e.g. lora (GET /api/methods lists them).")


class ConfigBody(BaseModel):
    config: dict[str, Any] = Field(description="A config as a mapping (the form's values).")


class YamlBody(BaseModel):
    yaml: str = Field(description="A config as YAML text.")


class JobBody(BaseModel):
    yaml: str | None = Field(None, description="The config as YAML text ...")
    config: dict[str, Any] | None = Field(None, description="... or as a mapping (give one of the two).")
    processes: int = Field(1, ge=1, le=64, description="Training processes on this machine, one per GPU "
                           "(`conjure train --num-processes`): the global batch is data.batch_size x processes.")


@router.get("/methods")
def methods() -> dict[str, Any]:
    return {"methods": [
        {"type": name, "title": (cls.__doc__ or name).strip().splitlines()[0], "families": list(cls.FAMILIES)}
        for name, cls in CONFIG_TYPES.items()
    ]}


@router.get("/config/schema")
def config_schema(type: str = Query(description="config type")) -> dict[str, Any]:  # noqa: A002 - the API's name
    return config_class(type).model_json_schema()


@router.post("/config/new")
def config_new(body: TypeBody, request: Request) -> dict[str, Any]:
    config = yaml.safe_load(starter_yaml(body.type))
    config["basic"]["output_dir"] = str(_ws(request).runs)
    return {"config": config}


@router.post("/config/validate")
def config_validate(body: ConfigBody, request: Request) -> dict[str, Any]:
    config, errors = check_config(_ws(request), body.config)
    form, filled = _form_data(config) if config is not None else (None, {})
    return {"ok": not errors, "errors": errors, "config": form, "preset": filled}


@router.post("/config/to-yaml")
def config_to_yaml(body: ConfigBody, request: Request) -> dict[str, Any]:
    """A valid config as the run will see it (every default filled in, but what its memory preset fills:
    `_form_data`); an invalid one as given, with its errors (so a half-filled form can still be edited as YAML)."""
    try:
        form = _form_data(parse_config(body.config))[0]
        return {"yaml": yaml.safe_dump(form, sort_keys=False, allow_unicode=True), "errors": []}
    except ConfigError as exc:
        text = yaml.safe_dump(body.config, sort_keys=False, allow_unicode=True)
        return {"yaml": text, "errors": config_errors(exc)}


@router.post("/config/from-yaml")
def config_from_yaml(body: YamlBody, request: Request) -> dict[str, Any]:
    return _from_yaml(_ws(request), body.yaml)


def _config_file(ws: Workspace, name: str) -> tuple[str, Path]:
    stem = name.removesuffix(".yaml")
    if not CONFIG_NAME.match(stem):
        raise ConjureError(f"config names use letters, digits, '_', '.' and '-' only (at most 100), not {name!r}")
    return stem, ws.resolve(ws.configs / f"{stem}.yaml")


@router.get("/configs")
def configs(request: Request) -> dict[str, Any]:
    names = sorted(p.stem for p in _ws(request).configs.glob("*.yaml") if CONFIG_NAME.match(p.stem))
    return {"configs": names}


@router.get("/configs/{name}")
def config_get(name: str, request: Request) -> dict[str, Any]:
    ws = _ws(request)
    stem, path = _config_file(ws, name)
    if not path.is_file():
        raise NotFound(f"no saved config {stem!r}")
    text = path.read_text(encoding="utf-8")
    return {"name": stem, "yaml": text, **_from_yaml(ws, text)}


@router.put("/configs/{name}")
def config_put(name: str, body: YamlBody, request: Request) -> dict[str, Any]:
    """Save YAML text as `<workspace>/configs/<name>.yaml` (replacing it). Drafts are allowed: the text must
    be a YAML mapping, not yet a valid config."""
    ws = _ws(request)
    stem, path = _config_file(ws, name)
    data, errors = _yaml_mapping(body.yaml)
    if data is None:
        raise ConjureError(errors[0]["message"])
    atomic_write_text(path, body.yaml)
    return {"name": stem}


@router.post("/config/estimate")
def config_estimate(body: YamlBody, request: Request) -> Any:
    """`conjure estimate` of the form's config (its YAML, as a job would run it): the JSON and the CLI's table;
    refused (400, every problem listed) when the config is not valid, paths gated as for a job."""
    from conjure.estimate.peaks import estimate
    from conjure.estimate.command import render

    data, errors = _yaml_mapping(body.yaml)
    config, errors = check_config(_ws(request), data) if data is not None else (None, errors)
    if errors:
        return JSONResponse({"error": "the config is not valid", "errors": errors}, status_code=400)
    result = estimate(config)
    return {"estimate": result.as_json(), "text": render(result)}


# --- jobs --------------------------------------------------------------------------------------------


@router.post("/jobs")
def job_create(body: JobBody, request: Request) -> Any:
    """Queue a run of a config; refused (400, with every problem listed) when it is not valid."""
    ws = _ws(request)
    if (body.yaml is None) == (body.config is None):
        raise ConjureError("give the config as yaml or as config (one of the two)")
    data, errors = _yaml_mapping(body.yaml) if body.yaml is not None else (body.config, [])
    config, errors = check_config(ws, data) if data is not None else (None, errors)
    if errors:
        return JSONResponse({"error": "the config is not valid", "errors": errors}, status_code=400)
    return {"job": _jobs(request).submit(config, body.processes).public()}


@router.get("/jobs")
def job_list(request: Request) -> dict[str, Any]:
    return {"jobs": [job.public() for job in _jobs(request).all_jobs()]}


@router.get("/jobs/{job_id}")
def job_get(job_id: int, request: Request) -> dict[str, Any]:
    return {"job": _jobs(request).get(job_id).public()}


@router.post("/jobs/{job_id}/cancel")
def job_cancel(job_id: int, request: Request) -> dict[str, Any]:
    return {"job": _jobs(request).cancel(job_id).public()}


@router.post("/jobs/{job_id}/resume")
def job_resume(job_id: int, request: Request) -> dict[str, Any]:
    return {"job": _jobs(request).resume(job_id).public()}
