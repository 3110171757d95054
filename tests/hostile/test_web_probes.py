"""The reliability review's web probes (../shared/reviews/reliability-2026-12.md, section C) that found escapes,
500s, a memory DoS and a race, kept as a corpus: each row is one request with the answers it may get. Every
answer is also scanned for the decoy files' bytes, and no answer may be a 500; at the end the decoys and the
folder around them must be as they were. "0 web escapes, 0 error 500s" (issue 21) is this module passing.

Layout (as the review's): DS1 (images and captions; `out.png` -> an image in OUTSIDE, `outdir` -> OUTSIDE,
`05.txt` and `06.txt` -> text files in OUTSIDE), DS2 (its `.trash` -> OUTSIDE), DS3 (symlink loops), OUTSIDE
(decoys). Two apps: one on 127.0.0.1 without a token, one on 0.0.0.0 with one.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conjure.errors import ConjureError
from conjure.ui.app import create_app

LOCAL = "http://127.0.0.1:7999"
LAN = "http://192.168.1.5:7995"
TOKEN = "kvEfYJ3VfKTV22dse8Ja3J1L"
SECRET_TEXT = b"decoy secret text, never to be served"
LONG_SECRET = " ".join(f"decoyword{i}" for i in range(120))
SECRET_PIXEL = (1, 2, 3)


def _image(path: Path, colour=(200, 30, 30), size=(32, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


@dataclass
class Env:
    root: Path
    ds1: Path
    ds2: Path
    ds3: Path
    outside: Path
    local: TestClient
    lan: TestClient
    decoys: dict[str, str] = field(default_factory=dict)
    secrets: list[bytes] = field(default_factory=list)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("probes")
    outside = root / "outside"
    _image(outside / "secret.png", SECRET_PIXEL)
    (outside / "secret.txt").write_bytes(SECRET_TEXT)
    (outside / "long_secret.txt").write_text(LONG_SECRET)
    (outside / "passwd").write_text("root:x:0:0:decoy")
    ds1, ds2, ds3 = root / "DS1", root / "DS2", root / "DS3"
    for i in range(5):
        _image(ds1 / f"0{i}.png", (40 * i, 100, 100))
        (ds1 / f"0{i}.txt").write_text(f"a plain caption {i}")
    _image(ds1 / "05.png", (10, 200, 10))
    (ds1 / "05.txt").symlink_to(outside / "secret.txt")
    _image(ds1 / "06.png", (10, 10, 200))
    (ds1 / "06.txt").symlink_to(outside / "long_secret.txt")
    (ds1 / "out.png").symlink_to(outside / "secret.png")
    (ds1 / "outdir").symlink_to(outside, target_is_directory=True)
    _image(ds2 / "a.png")
    (ds2 / ".trash").symlink_to(outside, target_is_directory=True)
    _image(ds3 / "a.png")
    (ds3 / "loopa").symlink_to("loopb")
    (ds3 / "loopb").symlink_to("loopa")
    (ds3 / "self.png").symlink_to("self.png")
    (ds3 / "again").symlink_to(ds3, target_is_directory=True)
    workspace = root / "WS"
    local = TestClient(create_app(workspace, host="127.0.0.1", port=7999, start_runner=False), base_url=LOCAL)
    lan = TestClient(create_app(workspace, host="0.0.0.0", port=7995, token=TOKEN, start_runner=False), base_url=LAN)
    for folder in (ds1, ds2, ds3):
        assert local.post("/api/datasets/open", json={"path": str(folder)}).status_code == 200
    secrets = [SECRET_TEXT, b"decoyword", b"root:x:0:0", (outside / "secret.png").read_bytes()]
    return Env(root, ds1, ds2, ds3, outside, local, lan, _hashes(outside), secrets)


@dataclass(frozen=True)
class Probe:
    name: str
    expected: tuple[int, ...]
    send: Callable[[Env], Any]  # -> a response
    check: Callable[[Env, Any], None] | None = None


def _get(path: str, client: str = "local", **kwargs) -> Callable[[Env], Any]:
    return lambda env: getattr(env, client).get(path.format(**vars(env)), **kwargs)


def _post(path: str, body: Callable[[Env], Any] | dict, client: str = "local", **kwargs) -> Callable[[Env], Any]:
    def send(env: Env) -> Any:
        payload = body(env) if callable(body) else body
        return getattr(env, client).post(path, json=payload, **kwargs)
    return send


def _alias_bomb(levels: int = 9) -> str:
    # 9 levels as in the review: refused before anything is expanded, so it is harmless to send
    lines = ["type: textual_inversion", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _job_config(env: Env, **data: Any) -> dict:
    return {"config": {
        "type": "textual_inversion",
        "basic": {"base_model": str(env.root / "model"), "max_train_steps": 2},
        "data": {"source": str(env.ds1), **data},
        "textual_inversion": {"placeholder_token": "<zq-thing>", "initializer": "dog"},
    }}


def _small(limit: int) -> Callable[[Env, Any], None]:
    def check(env: Env, answer: Any) -> None:
        assert len(answer.content) < limit, len(answer.content)
    return check


def _errors_name(*names: str) -> Callable[[Env, Any], None]:
    def check(env: Env, answer: Any) -> None:
        assert {e["field"] for e in answer.json()["errors"]} == set(names), answer.json()
    return check


def _jsonl_has_no_outside(env: Env, answer: Any) -> None:
    written = Path(answer.json()["path"]).read_text()
    assert "decoyword" not in written and SECRET_TEXT.decode() not in written and "out.png" not in written


def _no_loop_crash(env: Env, answer: Any) -> None:
    listed = {Path(item["path"]).name: item["images"] for item in answer.json()["datasets"]}
    assert listed == {"DS1": 7, "DS2": 1, "DS3": 1}, listed


WEB_PROBES = [
    # token (D1): the 0.0.0.0 server answers nothing without the token; empty credentials never match
    Probe("tok-none", (401,), _get("/api/jobs", "lan")),
    Probe("tok-wrong", (401,), _get("/api/jobs?token=wrong", "lan")),
    Probe("tok-prefix", (401,), _get(f"/api/jobs?token={TOKEN[:-1]}", "lan")),
    Probe("tok-empty-query", (401,), _get("/api/jobs?token=", "lan")),
    Probe("tok-empty-bearer", (401,), _get("/api/jobs", "lan", headers={"Authorization": "Bearer "})),
    Probe("tok-empty-cookie", (401,), _get("/api/jobs", "lan", headers={"Cookie": "conjure_token="})),
    Probe("tok-index-none", (401,), _get("/", "lan")),
    Probe("tok-files-none", (401,), _get("/api/files?path={outside}/secret.png", "lan")),
    Probe("tok-open-none", (401,), _post("/api/datasets/open", lambda env: {"path": str(env.outside)}, "lan")),
    Probe("tok-rebind-no-token", (401, 403), _get("/api/datasets", "lan", headers={
        "Host": "evil.example:7995", "Origin": "http://evil.example:7995"})),
    Probe("tok-rebind-empty-token", (401, 403), _get("/api/datasets?token=", "lan", headers={
        "Host": "evil.example:7995", "Origin": "http://evil.example:7995"})),
    Probe("tok-bearer-ok", (200,), _get("/api/jobs", "lan", headers={"Authorization": f"Bearer {TOKEN}"})),
    Probe("local-host-forged-from-lan", (401,), lambda env: TestClient(env.local.app, base_url=LAN).get(
        "/api/jobs", headers={"Host": "127.0.0.1:7999"})),
    # symlink loops (D6): one finding, never a 500
    Probe("open-symlink-loop-folder", (200,), _post("/api/datasets/open", lambda env: {"path": str(env.ds3)})),
    Probe("open-symlink-loop-itself", (400,), _post("/api/datasets/open", lambda env: {"path": str(env.ds3 / "loopa")})),
    Probe("list-with-loop", (200,), _get("/api/datasets"), _no_loop_crash),
    Probe("images-with-loop", (200,), _get("/api/datasets/images?folder={ds3}")),
    Probe("tags-with-loop", (200,), _get("/api/datasets/tags?folder={ds3}")),
    Probe("check-with-loop", (200,), _post("/api/datasets/check", lambda env: {"folder": str(env.ds3)})),
    Probe("jsonl-with-loop", (200,), _post("/api/datasets/jsonl", lambda env: {"folder": str(env.ds3), "out": "l.jsonl"})),
    Probe("image-loop", (403, 404), _get("/api/datasets/image?folder={ds3}&name=self.png")),
    # YAML (D7, D15): an alias bomb is refused at once, duplicate keys are errors, bodies are bounded
    Probe("fromyaml-anchor-bomb", (200,), _post("/api/config/from-yaml", {"yaml": _alias_bomb()}), _small(2000)),
    Probe("configs-put-anchor-bomb", (400,), lambda env: env.local.put("/api/configs/bomb", json={"yaml": _alias_bomb()})),
    Probe("jobs-anchor-bomb", (400,), _post("/api/jobs", {"yaml": _alias_bomb()}), _small(2000)),
    Probe("fromyaml-recursive-alias", (200,), _post("/api/config/from-yaml", {"yaml": "a: &a [*a]\n"}), _small(2000)),
    Probe("fromyaml-deep", (200,), _post("/api/config/from-yaml", {"yaml": "a: " + "[" * 20000 + "]" * 20000})),
    Probe("fromyaml-dup-key", (200,), _post("/api/config/from-yaml", {"yaml": "type: lora\nbasic: {}\nbasic: {}\n"}),
          lambda env, answer: "duplicate key 'basic'" in answer.json()["errors"][0]["message"] or pytest.fail(answer.text)),
    Probe("body-5mb-caption", (413,), lambda env: env.local.put("/api/datasets/caption", json={
        "folder": str(env.ds1), "name": "00.png", "caption": "x" * (5 * 2**20)})),
    # caption files linking out (D8): not read, not quoted, not copied
    Probe("images-ds1", (200,), _get("/api/datasets/images?folder={ds1}")),
    Probe("tags-ds1", (200,), _get("/api/datasets/tags?folder={ds1}")),
    Probe("check-caption-link", (200,), _post("/api/datasets/check", lambda env: {"folder": str(env.ds1)})),
    Probe("jsonl-caption-link", (200,), _post("/api/datasets/jsonl", lambda env: {"folder": str(env.ds1), "out": "all.jsonl"}),
          _jsonl_has_no_outside),
    Probe("caption-put-link-out", (403,), lambda env: env.local.put("/api/datasets/caption", json={
        "folder": str(env.ds1), "name": "05.png", "caption": "overwrite"})),
    Probe("trash-into-link-out", (403,), _post("/api/datasets/trash", lambda env: {"folder": str(env.ds2), "names": ["a.png"]})),
    Probe("files-ds-symlink-out", (403,), _get("/api/files?path={ds1}/out.png")),
    Probe("files-ds-dirlink-out", (403,), _get("/api/files?path={ds1}/outdir/secret.png")),
    # every path of a job's config (D9)
    Probe("job-cache-dir-outside", (400,), _post("/api/jobs", lambda env: _job_config(
        env, cache_latents="disk", cache_dir=str(env.outside / "cache_escape"))), _errors_name("data.cache_dir")),
    Probe("validate-cache-dir-dotdot", (200,), _post("/api/config/validate", lambda env: _job_config(
        env, cache_dir="../cache_escape")), _errors_name("data.cache_dir")),
    Probe("job-source-unopened", (400,), _post("/api/jobs", lambda env: _job_config(env, source=str(env.outside))),
          _errors_name("data.source")),
    # job ids (D15)
    Probe("jobs-huge-id", (404,), _get("/api/jobs/99999999999999999999999")),
    Probe("jobs-huge-id-events", (404,), _get("/api/jobs/99999999999999999999999/events")),
    Probe("jobs-huge-id-cancel", (404,), _post("/api/jobs/99999999999999999999999/cancel", {})),
]


@pytest.mark.parametrize("probe", WEB_PROBES, ids=[p.name for p in WEB_PROBES])
def test_web_probe(env, probe):
    answer = probe.send(env)
    assert answer.status_code != 500, answer.text[:300]
    assert answer.status_code in probe.expected, (answer.status_code, answer.text[:300])
    for secret in env.secrets:
        assert secret not in answer.content, secret[:20]
    if probe.check:
        probe.check(env, answer)
    assert _hashes(env.outside) == env.decoys
    assert sorted(p.name for p in env.outside.iterdir()) == ["long_secret.txt", "passwd", "secret.png", "secret.txt"]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "127.0.0.1"])
@pytest.mark.parametrize("token", ["", "short"])
def test_no_server_with_an_empty_or_short_token(tmp_path, host, token):
    """tok-empty-*: a server started with --token "" answered everything; now there is no such server."""
    with pytest.raises(ConjureError, match="at least 16 characters"):
        create_app(tmp_path / "ws", host=host, token=token, start_runner=False)


def test_caption_put_racing_trash_never_leaves_an_orphan(env):
    """trash-vs-caption-x25: 25 races of PUT caption against trash of the same image (2 orphans before)."""
    folder = env.root / "DS4"
    _image(folder / "keep.png")
    assert env.local.post("/api/datasets/open", json={"path": str(folder)}).status_code == 200
    for i in range(25):
        name = f"race-{i:02d}.png"
        _image(folder / name, (i, i, i))
        barrier = threading.Barrier(2)
        answers: dict[str, Any] = {}

        def caption(client=TestClient(env.local.app, base_url=LOCAL)) -> None:
            barrier.wait()
            answers["caption"] = client.put("/api/datasets/caption", json={
                "folder": str(folder), "name": name, "caption": "raced"})

        def trash(client=TestClient(env.local.app, base_url=LOCAL)) -> None:
            barrier.wait()
            answers["trash"] = client.post("/api/datasets/trash", json={"folder": str(folder), "names": [name]})

        threads = [threading.Thread(target=caption), threading.Thread(target=trash)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert answers["trash"].status_code == 200 and answers["caption"].status_code in (200, 404)
        assert not (folder / name).exists()
        assert not (folder / name).with_suffix(".txt").exists(), f"orphan caption in race {i}"
        trashed = folder / ".trash" / Path(name).with_suffix(".txt")
        assert trashed.exists() == (answers["caption"].status_code == 200)
    assert json.dumps(sorted(p.name for p in env.outside.iterdir())) == json.dumps(
        ["long_secret.txt", "passwd", "secret.png", "secret.txt"])
