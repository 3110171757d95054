"""Install a checkpoint's files through a running InvokeAI's model-install API (`conjure export --invokeai-url`).

Followed: InvokeAI 6.13.8 (tag v6.13.8, commit eb721633), invokeai/app/api/routers/model_manager.py, mounted
under /api (app/api_app.py):
- `POST /api/v2/models/install?source=PATH&inplace=false`, JSON body a ModelRecordChanges (`{}`: InvokeAI probes
  every field) -> 201 and a ModelInstallJob; 409 when that source is installed or installing, 415 when the file
  is not a model it recognises, 401 in multi-user mode without a login (app/api/auth_dependencies.py).
- `GET /api/v2/models/install/{id}` -> the job: `status` waiting, downloading, downloads_done, running, paused,
  then completed (`config_out`: the model's key, name, type, base), error (`error_reason`, `error`) or cancelled
  (app/services/model_install/model_install_common.py InstallStatus, ModelInstallJob).
- `GET /api/v2/models/?model_name=NAME&model_type=TYPE` -> {"models": [configs]} (list_model_records), and
  `DELETE /api/v2/models/i/{key}` -> 204 (delete_model: the record, and the file inside InvokeAI's models folder).
A local source installed with inplace=false is *moved* into InvokeAI's models folder (model_install_default.py
install_path), so each file is copied to a folder of its own first: the run's checkpoint stays whole. InvokeAI
reads that path itself, so it must run on this machine (or see the same disk at the same path).

Only the standard library: a few JSON requests and a poll.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conjure.errors import ConjureError
from conjure.runs.export import checkpoint_files, copy_files

MODELS_PATH = "/api/v2/models/"
INSTALL_PATH = "/api/v2/models/install"
FINISHED = ("completed", "error", "cancelled")
REQUEST_TIMEOUT_S = 30.0
# A local install only probes, hashes and moves the file; two minutes cover a large LoRA on a slow disk.
INSTALL_TIMEOUT_S = 120.0
POLL_FIRST_S, POLL_MAX_S = 0.05, 1.0


@dataclass(frozen=True)
class InvokeModel:
    """A model InvokeAI created (its config_out), and the file it came from."""

    file: str
    key: str
    name: str
    type: str
    base: str


def check_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConjureError(f"--invokeai-url: InvokeAI's address, e.g. http://127.0.0.1:9090, not {url!r}")
    return url.rstrip("/")


def _refusal(url: str, code: int, detail: str, file: str) -> str:
    if code in (401, 403):
        return (f"InvokeAI at {url} asks for a login (multi-user mode), which conjure cannot give; install with "
                f"--to-app invokeai --app-dir DIR and its Model Manager's Scan Folder instead")
    what = {409: "is installed or being installed already", 415: "is not a model InvokeAI recognises",
            404: "cannot be installed there: no model-install API (is it InvokeAI 4 or later?)"}.get(code, "was refused")
    return f"InvokeAI at {url}: {file} {what} (HTTP {code}{f': {detail}' if detail else ''})"


def _call(url: str, method: str, path: str, file: str, query: dict[str, str] | None = None) -> Any:
    """One request about installing `file`, and its JSON answer (None for none); every failure becomes one
    ConjureError line."""
    address = f"{url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    body = b"{}" if method == "POST" else None
    request = urllib.request.Request(address, data=body, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as answer:
            data = answer.read()
        return json.loads(data) if data else None
    except urllib.error.HTTPError as exc:
        try:
            detail = str(json.loads(exc.read()).get("detail") or "")
        except (ValueError, AttributeError, OSError):
            detail = ""
        raise ConjureError(_refusal(url, exc.code, detail, file)) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ConjureError(f"cannot reach InvokeAI at {url}: {getattr(reason, 'strerror', None) or reason} (is it "
                           f"running? check --invokeai-url)") from None
    except ValueError:
        raise ConjureError(f"{url} answered {path} with something other than JSON: is it InvokeAI?") from None


def _job(url: str, method: str, path: str, file: str, query: dict[str, str] | None = None) -> dict[str, Any]:
    job = _call(url, method, path, file, query)
    if not isinstance(job, dict) or "status" not in job:
        raise ConjureError(f"{url} answered {path} without an install job: is it InvokeAI?")
    return job


def _same_named(url: str, name: str, kind: str, file: str) -> list[dict[str, Any]]:
    """InvokeAI's models named `name` of type `kind` (conjure's kinds are InvokeAI's ModelType values)."""
    found = _call(url, "GET", MODELS_PATH, file, {"model_name": name, "model_type": kind})
    if not isinstance(found, dict) or not isinstance(found.get("models"), list):
        raise ConjureError(f"{url} answered {MODELS_PATH} without a model list: is it InvokeAI?")
    return [m for m in found["models"] if isinstance(m, dict)]


def _finished_job(url: str, job: dict[str, Any], source: str, timeout: float) -> dict[str, Any]:
    """Poll the job until it ends: soon at first (a local file installs in well under a second), then every
    POLL_MAX_S."""
    deadline, wait = time.monotonic() + timeout, POLL_FIRST_S
    while job["status"] not in FINISHED:
        if time.monotonic() > deadline:
            raise ConjureError(f"InvokeAI at {url} has not finished installing {source} after {timeout:.0f} s (install "
                               f"job {job.get('id')}: {job['status']}); see its Model Manager")
        time.sleep(wait)
        wait = min(2 * wait, POLL_MAX_S)
        job = _job(url, "GET", f"{INSTALL_PATH}/{job.get('id')}", source)
    return job


def _model(job: dict[str, Any], url: str, source: str) -> InvokeModel:
    if job["status"] != "completed":
        why = job.get("error") or job.get("error_reason") or job["status"]
        raise ConjureError(f"InvokeAI at {url} could not install {source}: {why}")
    config = job.get("config_out") or {}
    return InvokeModel(source, *(str(config.get(k, "?")) for k in ("key", "name", "type", "base")))


def _replaced(url: str, files: list[tuple[Path, str, str]], force: bool, one_file: bool) -> list[list[str]]:
    """Per (source, name, kind), the keys of InvokeAI's models of the same name and type, which its install
    replaces (`force`) or which stop the installs before any starts. InvokeAI keeps two models of one name (it
    dropped the unique (name, base, type) in migration_22), and then `<name>` in a prompt finds both and applies
    neither (app/util/ti_utils.py generate_ti_list: "more than one similarly-named textual inversion models")."""
    replaced = []
    for _, dest, kind in files:
        name = Path(dest).stem
        found = _same_named(url, name, kind, dest)
        if found and not force:
            keys = ", ".join(str(m.get("key")) for m in found)
            other_name = " or give another name (--name)" if one_file else ""
            raise ConjureError(f"InvokeAI at {url} has a {kind} named {name!r} already (key {keys}); replace it "
                               f"(--force){other_name}")
        replaced.append([str(m.get("key")) for m in found])
    return replaced


def install_via_api(
    run_dir: Path, step: str | int, url: str, *, name: str | None = None, force: bool = False,
    timeout: float = INSTALL_TIMEOUT_S,
) -> tuple[list[InvokeModel], list[tuple[str, str]]]:
    """Install each of the checkpoint's files that InvokeAI reads into the InvokeAI at `url`, one after the other,
    then remove the models of the same names they replace (`force`); returns the models it created and the files
    left out (name, kind: those of kinds conjure.runs.apps.INVOKEAI has no folder for). Stops at the first file InvokeAI refuses, saying which (the files
    before it stay installed)."""
    from conjure.runs.apps import INVOKEAI, file_kind

    url = check_url(url)
    found = [(src, dest, file_kind(src)[0]) for src, dest in checkpoint_files(run_dir, step, name)]
    files = [(src, dest, kind) for src, dest, kind in found if kind in INVOKEAI.folders]
    replaced = _replaced(url, files, force, one_file=len(found) == 1)
    staging = Path(tempfile.mkdtemp(prefix="conjure-invokeai-"))
    staging.chmod(0o755)  # InvokeAI may run as another user; mkdtemp's folder is the owner's only
    waiting = False  # on a job that did not finish in time, which may still read its file
    try:
        models: list[InvokeModel] = []
        for (src, dest, _), old_keys in zip(files, replaced):
            # one folder per file: InvokeAI moves the file out, and a source it installed before is refused (409)
            [staged] = copy_files([(src, staging / f"{len(models)}" / dest)])
            staged.parent.chmod(0o755)
            job = _job(url, "POST", INSTALL_PATH, dest, {"source": str(staged), "inplace": "false"})
            waiting = True
            job = _finished_job(url, job, dest, timeout)
            waiting = False
            models.append(_model(job, url, dest))
            for key in old_keys:  # after the new one is in: a failed install leaves the old model
                _call(url, "DELETE", f"{MODELS_PATH}i/{key}", dest)
        return models, [(dest, kind) for _, dest, kind in found if kind not in INVOKEAI.folders]
    finally:
        if not waiting:
            shutil.rmtree(staging, ignore_errors=True)


def report_lines(url: str, models: list[InvokeModel], left_out: list[tuple[str, str]]) -> list[str]:
    from conjure.runs.apps import INVOKEAI, LEFT_OUT

    lines = []
    for model in models:
        lines.append(f"installed {model.file} in InvokeAI at {url}: {model.type} {model.name!r} for {model.base} "
                     f"(key {model.key})")
        usage = INVOKEAI.usage.get(model.type)  # by the type InvokeAI probed
        if usage:
            lines.append(f"in {INVOKEAI.title}: {usage.format(name=model.name, file=model.file)}")
    return lines + [f"left out {file}: {LEFT_OUT[kind].format(app=INVOKEAI.title)}" for file, kind in left_out]
