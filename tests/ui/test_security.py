"""The web app's security rules (conjure.ui.app, conjure.ui.workspace): every endpoint that takes a file path or
a folder refuses paths outside the opened data sets and the workspace however they are spelled, and writes
nothing outside them; other web pages, unknown hosts and (in token mode) token-less clients are refused."""

import json
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conjure.errors import ConjureError
from conjure.ui.app import create_app
from conjure.ui.workspace import PathRefused, Workspace

BASE = "http://127.0.0.1:7860"
SECRET = b"top secret, outside every opened folder"
TOKEN = "s3cret-s3cret-s3cret"


def _image(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), colour).save(path)
    return path


def _snapshot(folder: Path) -> dict[str, tuple[bytes | str, int]]:
    """Every entry under `folder` (links not followed) -> (content or link target, mtime)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        content = os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else "dir"
        found[path.relative_to(folder).as_posix()] = (content, info.st_mtime_ns)
    return found


class Setup:
    """tmp/data/set (opened) next to tmp/data/set-evil (never opened, its name starts with the opened one's)
    and tmp/outside; inside the opened set, links pointing out to files and folders."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.folder = tmp_path / "data" / "set"
        self.evil = tmp_path / "data" / "set-evil"
        self.outside = tmp_path / "outside"
        _image(self.folder / "a.png")
        (self.folder / "a.txt").write_text("a caption")
        _image(self.folder / "~draft.png")  # a literal file name, not a home folder
        for folder in (self.evil, self.outside):
            _image(folder / "secret.png", (1, 2, 3))
            (folder / "secret.txt").write_bytes(SECRET)
        (self.folder / "link.png").symlink_to(self.outside / "secret.png")
        (self.folder / "linkdir").symlink_to(self.outside, target_is_directory=True)
        (self.outside / "back.png").symlink_to(self.folder / "a.png")  # out through linkdir, and back in
        _image(self.folder / "c.png")
        (self.folder / "c.txt").symlink_to(self.outside / "secret.txt")  # a caption file pointing out
        self.workspace = tmp_path / "ws"
        self.app = create_app(self.workspace, start_runner=False)
        self.client = TestClient(self.app, base_url=BASE)
        assert self.client.post("/api/datasets/open", json={"path": str(self.folder)}).status_code == 200

    def guarded(self) -> dict[str, dict]:
        """Snapshots of everything outside the opened set and the workspace."""
        return {str(folder): _snapshot(folder) for folder in (self.evil, self.outside)} | {
            "tmp": sorted(p.name for p in self.tmp.iterdir()), "data": sorted(p.name for p in self.tmp.joinpath("data").iterdir())}


@pytest.fixture
def setup(tmp_path):
    return Setup(tmp_path)


def _name_attacks(s: Setup) -> list[str]:
    return [
        "../set-evil/secret.png",
        "a/../../set-evil/secret.png",
        "../../outside/secret.png",
        "/etc/passwd",
        str(s.outside / "secret.png"),
        str(s.evil / "secret.png"),
        str(s.folder / "a.png"),  # names are relative, even to a file inside
        "link.png",  # a file link pointing out
        "linkdir/secret.png",  # a folder link pointing out
        "linkdir/back.png",  # ... to a link back in: the file is inside, its caption and mask would not be
        "%2e%2e%2fset-evil%2fsecret.png",  # what a double-encoded URL decodes to once
        "%2E%2E/set-evil/secret.png",
        "..%2fset-evil%2fsecret.png",
        "..\\set-evil\\secret.png",
        "a.png\\..\\..\\set-evil\\secret.png",
        "\\\\evil.example\\share\\x.png",
        "//evil.example/share/x.png",
        "a.png\x00.txt",
        "../set/a.png",  # .. even when it lands inside
        ".trash/a.png",
        "",
    ]


def _folder_attacks(s: Setup) -> list[str]:
    return [
        str(s.evil),  # a sibling whose name starts with the opened one's
        str(s.folder) + "-evil",
        str(s.folder.parent),  # the parent was never opened
        str(s.folder / ".." / "set-evil"),
        str(s.outside),
        "data/set",  # relative
        "/",
        str(s.folder) + "\x00",
        str(s.folder / "linkdir"),  # a link inside the set is not itself a data set
        str(s.workspace),
    ]


def _requests(s: Setup, folder: str, name: str) -> dict[str, tuple[str, str, dict]]:
    """Every data-set endpoint that takes a folder (and a name, where it takes one): (method, path, kwargs)."""
    png = (s.evil / "secret.png").read_bytes()
    return {
        "image": ("GET", "/api/datasets/image", {"params": {"folder": folder, "name": name}}),
        "thumb": ("GET", "/api/datasets/thumb", {"params": {"folder": folder, "name": name}}),
        "caption": ("PUT", "/api/datasets/caption", {"json": {"folder": folder, "name": name, "caption": "pwned"}}),
        "bulk": ("POST", "/api/datasets/bulk", {"json": {"folder": folder, "names": [name], "op": "prefix", "text": "x"}}),
        "trash": ("POST", "/api/datasets/trash", {"json": {"folder": folder, "names": ["a.png", name]}}),
        "jsonl": ("POST", "/api/datasets/jsonl", {"json": {"folder": folder, "out": name + ".jsonl"}}),
        "upload": ("POST", "/api/datasets/upload", {"data": {"folder": folder}, "files": [("files", ("x.png", png))]}),
        "images": ("GET", "/api/datasets/images", {"params": {"folder": folder}}),
        "tags": ("GET", "/api/datasets/tags", {"params": {"folder": folder}}),
        "check": ("POST", "/api/datasets/check", {"json": {"folder": folder}}),
        "bulk-all": ("POST", "/api/datasets/bulk", {"json": {"folder": folder, "names": None, "op": "suffix", "text": "x"}}),
    }


NAME_ENDPOINTS = ("image", "thumb", "caption", "bulk", "trash", "jsonl")


def _assert_refused(answer, what) -> None:
    assert answer.status_code == 403, (what, answer.status_code, answer.text[:200])
    assert SECRET not in answer.content and b"\x01\x02\x03" not in answer.content


def test_names_outside_the_opened_folder_are_refused_everywhere(setup):
    before, inside = setup.guarded(), _snapshot(setup.folder)
    folder = str(setup.folder)
    for name in _name_attacks(setup):
        for endpoint, (method, path, kwargs) in _requests(setup, folder, name).items():
            if endpoint in NAME_ENDPOINTS and not (endpoint == "jsonl" and name == "link.png"):  # link.png.jsonl: fine
                _assert_refused(setup.client.request(method, path, **kwargs), (endpoint, name))
    assert setup.guarded() == before
    assert _snapshot(setup.folder) == inside  # refused before anything was written, even inside


def test_folders_that_were_never_opened_are_refused_everywhere(setup):
    before, inside = setup.guarded(), _snapshot(setup.folder)
    for folder in _folder_attacks(setup):
        for endpoint, (method, path, kwargs) in _requests(setup, folder, "a.png").items():
            _assert_refused(setup.client.request(method, path, **kwargs), (endpoint, folder))
    assert setup.guarded() == before and _snapshot(setup.folder) == inside


def test_encoded_tricks_in_raw_urls(setup):
    """The URL as a browser or curl sends it: decoded once by the server, never twice."""
    folder = str(setup.folder).replace("/", "%2F")
    for name in ("..%2Fset-evil%2Fsecret.png", "%2e%2e%2fset-evil%2fsecret.png", "%252e%252e%252fset-evil%252fsecret.png",
                 "..%5Cset-evil%5Csecret.png", "%2e%2e%5cset-evil%5csecret.png", "a.png%00", "%252e%252e/x.png",
                 "link.png", "linkdir%2Fsecret.png"):
        for endpoint in ("image", "thumb"):
            _assert_refused(setup.client.get(f"/api/datasets/{endpoint}?folder={folder}&name={name}"), name)
    evil = str(setup.folder).replace("/", "%2F") + "%2F..%2Fset-evil"
    _assert_refused(setup.client.get(f"/api/datasets/images?folder={evil}"), evil)
    assert setup.client.get(f"/api/datasets/image?folder={folder}&name=a.png").status_code == 200


def test_what_is_inside_is_served_and_links_pointing_out_are_not_listed(setup):
    client, folder = setup.client, str(setup.folder)
    listing = client.get("/api/datasets/images", params={"folder": folder}).json()["images"]
    assert [image["name"] for image in listing] == ["a.png", "c.png", "~draft.png"]  # no link.png, no linkdir
    assert [image["caption"] for image in listing] == ["a caption", None, None]  # c.txt points out: not read
    assert client.get("/api/datasets/image", params={"folder": folder, "name": "~draft.png"}).status_code == 200
    assert client.get("/api/datasets/image", params={"folder": folder, "name": "~/draft.png"}).status_code == 404
    assert client.get("/api/datasets/thumb", params={"folder": folder, "name": "a.png"}).status_code == 200
    # c.png's caption file points out: writing or editing it is refused, trashing moves the link, not its target
    for method, path, body in (("PUT", "caption", {"name": "c.png", "caption": "x"}),
                               ("POST", "bulk", {"names": ["c.png"], "op": "prefix", "text": "x"})):
        _assert_refused(client.request(method, f"/api/datasets/{path}", json={"folder": folder, **body}), path)
    assert (setup.outside / "secret.txt").read_bytes() == SECRET
    assert client.post("/api/datasets/trash", json={"folder": folder, "names": ["c.png"]}).json() == {"moved": ["c.png"]}
    assert (setup.folder / ".trash" / "c.txt").is_symlink() and (setup.outside / "secret.txt").read_bytes() == SECRET


def test_a_trash_folder_pointing_out_is_refused(setup):
    (setup.folder / ".trash").symlink_to(setup.outside, target_is_directory=True)
    before = setup.guarded()
    answer = setup.client.post("/api/datasets/trash", json={"folder": str(setup.folder), "names": ["a.png"]})
    assert answer.status_code == 403 and (setup.folder / "a.png").is_file()
    assert setup.guarded() == before


def test_a_folder_replaced_by_a_link_after_opening_is_refused(setup):
    setup.folder.rename(setup.tmp / "moved")
    setup.folder.symlink_to(setup.outside, target_is_directory=True)
    for endpoint, (method, path, kwargs) in _requests(setup, str(setup.folder), "secret.png").items():
        _assert_refused(setup.client.request(method, path, **kwargs), endpoint)


def test_files_endpoint_refuses_paths_outside(setup):
    client = setup.client
    before = setup.guarded()
    for path in ("../outside/secret.txt", "runs/../../outside/secret.txt", "/etc/passwd", str(setup.outside / "secret.txt"),
                 str(setup.evil / "secret.txt"), str(setup.folder) + "-evil/secret.txt", str(setup.folder / "link.png"),
                 str(setup.folder / "linkdir" / "secret.txt"), str(setup.folder / "c.txt"),
                 str(setup.folder / ".." / "set-evil" / "secret.txt"), "%2e%2e%2foutside%2fsecret.txt",
                 str(setup.folder / "a.png") + "\x00", "//evil.example/share/x"):
        _assert_refused(client.get("/api/files", params={"path": path}), path)
    assert client.get("/api/files", params={"path": "~/x.png"}).status_code == 404  # literal: <workspace>/~/
    # only images: the workspace's own database and lists are not for pages
    (setup.workspace / "conjure.db").write_bytes(b"SQLite")
    for inside in ("conjure.db", "datasets.json", str(setup.workspace / "conjure.db"), str(setup.folder / "a.txt")):
        _assert_refused(client.get("/api/files", params={"path": inside}), inside)
    for raw in ("..%2Foutside%2Fsecret.txt", "%252e%252e%252foutside%252fsecret.txt"):
        _assert_refused(client.get(f"/api/files?path={raw}"), raw)
    answer = client.get("/api/files", params={"path": str(setup.folder / "a.png")})
    assert answer.status_code == 200 and answer.content == (setup.folder / "a.png").read_bytes()
    assert setup.guarded() == before


# --- other web pages, hosts, tokens ---------------------------------------------------------------------------


def test_other_origins_are_refused(setup):
    client = setup.client
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": "http://127.0.0.1:9999"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        assert client.get("/api/datasets", headers=headers).status_code == 403, headers
        answer = client.post("/api/datasets/open", json={"path": str(setup.evil)}, headers=headers)
        assert answer.status_code == 403 and answer.json() == {"error": "cross-origin request refused"}
        assert client.options("/api/datasets", headers={**headers, "Access-Control-Request-Method": "POST"}).status_code == 403
    assert str(setup.evil) not in client.get("/api/datasets").text
    for headers in ({"Origin": BASE}, {"Origin": "http://localhost:7860"}, {"Sec-Fetch-Site": "same-origin"},
                    {"Sec-Fetch-Site": "none"}, {}):
        assert client.get("/api/datasets", headers=headers).status_code == 200, headers
    answer = client.get("/api/datasets/image", params={"folder": str(setup.folder), "name": "a.png"})
    assert answer.headers["cross-origin-resource-policy"] == "same-origin"  # not even embeddable elsewhere
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert "access-control-allow-origin" not in answer.headers


def test_unknown_hosts_are_refused(setup):
    client = setup.client
    for host in ("evil.example", "evil.example:7860", "127.0.0.1.evil.example:7860", "127.0.0.1:7861", "0.0.0.0:7860"):
        answer = client.get("/api/datasets", headers={"Host": host})
        assert answer.status_code == 403 and answer.json() == {"error": "unknown host"}, host
    for host in ("127.0.0.1:7860", "localhost:7860", "localhost"):
        assert client.get("/api/datasets", headers={"Host": host}).status_code == 200, host
    lan = TestClient(create_app(setup.workspace, host="192.168.1.5", token=TOKEN, start_runner=False),
                     base_url="http://192.168.1.5:7860", headers={"Authorization": f"Bearer {TOKEN}"})
    assert lan.get("/api/datasets").status_code == 200
    assert lan.get("/api/datasets", headers={"Host": "evil.example:7860"}).status_code == 403  # rebinding


def test_token_mode(setup):
    app = create_app(setup.workspace, host="0.0.0.0", token=TOKEN, start_runner=False)
    client = TestClient(app, base_url="http://192.168.1.5:7860")
    for kwargs in ({}, {"headers": {"Authorization": "Bearer wrong"}}, {"params": {"token": "wrong"}},
                   {"headers": {"Authorization": TOKEN}}, {"headers": {"Authorization": f"Basic {TOKEN}"}}):
        answer = client.get("/api/datasets", **kwargs)
        assert answer.status_code == 401 and answer.json() == {"error": "token required"}, kwargs
        assert client.post("/api/datasets/open", json={"path": str(setup.evil)}, **kwargs).status_code == 401
    wrong_cookie = TestClient(app, base_url="http://192.168.1.5:7860", cookies={"conjure_token": "wrong"})
    assert wrong_cookie.get("/api/datasets").status_code == 401
    assert client.get("/api/datasets", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert TestClient(app, base_url="http://192.168.1.5:7860", cookies={"conjure_token": TOKEN}).get(
        "/api/datasets").status_code == 200

    fresh = TestClient(app, base_url="http://192.168.1.5:7860")
    answer = fresh.get("/api/datasets", params={"token": TOKEN})
    assert answer.status_code == 200
    cookie = answer.headers["set-cookie"].lower()
    assert f"conjure_token={TOKEN}".lower() in cookie and "httponly" in cookie and "samesite=strict" in cookie
    assert fresh.get("/api/datasets").status_code == 200  # the cookie now carries the token
    # a token does not open the door to other web pages
    answer = client.get("/api/datasets", headers={"Authorization": f"Bearer {TOKEN}", "Origin": "http://evil.example"})
    assert answer.status_code == 403


def test_a_server_beyond_this_machine_needs_a_token(tmp_path):
    for host in ("0.0.0.0", "::", "192.168.1.5"):
        with pytest.raises(ConjureError, match="must require a token"):
            create_app(tmp_path / "ws", host=host, start_runner=False)
    create_app(tmp_path / "ws", host="localhost", start_runner=False)


def test_empty_or_short_tokens_are_refused_on_every_host(tmp_path):
    """An empty `--token "$UNSET"` once served the network with no authentication (issue 21, D1)."""
    for host in ("0.0.0.0", "::", "192.168.1.5", "127.0.0.1", "localhost"):
        for token in ("", "short", "x" * 15):
            with pytest.raises(ConjureError, match="at least 16 characters"):
                create_app(tmp_path / "ws", host=host, token=token, start_runner=False)
    create_app(tmp_path / "ws", host="0.0.0.0", token="x" * 16, start_runner=False)


def test_no_credentials_and_empty_credentials_never_pass(setup):
    app = create_app(setup.workspace, host="0.0.0.0", token=TOKEN, start_runner=False)
    rebinding = {"Host": "evil.example:7860", "Origin": "http://evil.example:7860"}
    for base in ("http://192.168.1.5:7860", "http://127.0.0.1:7860"):
        client = TestClient(app, base_url=base)
        for kwargs in ({}, {"params": {"token": ""}}, {"headers": {"Authorization": "Bearer "}},
                       {"headers": {"Cookie": "conjure_token="}}, {"headers": rebinding},
                       {"headers": rebinding, "params": {"token": ""}}):
            for method, url in (("GET", "/api/jobs"), ("GET", "/api/datasets"), ("GET", "/"),
                                ("GET", f"/api/files?path={setup.outside / 'secret.png'}")):
                answer = client.request(method, url, **kwargs)
                assert answer.status_code in (401, 403), (base, kwargs, url, answer.status_code)
            answer = client.post("/api/datasets/open", json={"path": str(setup.outside)}, **kwargs)
            assert answer.status_code in (401, 403), (base, kwargs)
    assert str(setup.outside) not in setup.workspace.joinpath("datasets.json").read_text()


def test_a_tokenless_app_answers_loopback_connections_only(setup):
    """An app built for 127.0.0.1 but served on all interfaces by hand: a client elsewhere forges the Host
    header, but not the address its connection arrived on."""
    for base in ("http://192.168.1.5:7860", "http://10.0.0.2:7860"):
        answer = TestClient(setup.app, base_url=base).get("/api/jobs", headers={"Host": "127.0.0.1:7860"})
        assert answer.status_code == 401 and answer.json() == {"error": "token required"}, base
    for base in ("http://127.0.0.1:7860", "http://[::1]:7860", "http://localhost:7860"):
        answer = TestClient(setup.app, base_url=base).get("/api/jobs", headers={"Host": "127.0.0.1:7860"})
        assert answer.status_code == 200, base


# --- the gate itself (Workspace.resolve) ---------------------------------------------------------------------


@pytest.fixture
def ws(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    (tmp_path / "set").mkdir()
    workspace.open_dataset(tmp_path / "set")
    return workspace


def test_resolve_takes_names_literally(ws, tmp_path):
    folder = ws.dataset_root(tmp_path / "set")
    assert ws.resolve("~/x.png", under=folder) == folder / "~" / "x.png"  # never the home folder
    assert ws.resolve("~root/x.png", under=folder) == folder / "~root" / "x.png"
    assert ws.resolve("~no-such-user", under=folder) == folder / "~no-such-user"  # not a RuntimeError
    assert ws.resolve("100% cotton.png", under=folder) == folder / "100% cotton.png"
    assert ws.resolve("sub/./a.png", under=folder) == folder / "sub" / "a.png"
    assert ws.resolve("~/x.png") == ws.root / "~" / "x.png"  # relative to the workspace: literal too


def test_resolve_refuses_tricks(ws, tmp_path):
    folder = ws.dataset_root(tmp_path / "set")
    (tmp_path / "set-evil").mkdir()
    (folder / "loop").symlink_to(folder / "loop")
    for name in ("..", "../set-evil", "a\\b.png", "..\\set-evil", "%2e%2e", "%2F", "a%5cb", "a%00", "x\x00",
                 "//host/share", "\\\\host\\share", str(tmp_path / "set-evil" / "x.png"), "loop/x.png"):
        with pytest.raises(PathRefused):
            ws.resolve(name, under=folder)
    with pytest.raises(PathRefused):
        ws.resolve("x", under=tmp_path / "set-evil")  # `under` must itself lie inside a root
    with pytest.raises(PathRefused):
        ws.resolve(str(tmp_path / "set-evil" / "x"))
    assert ws.resolve(str(folder / "x.png")) == folder / "x.png"
    assert ws.resolve("runs/x.png") == ws.root / "runs" / "x.png"


def test_dataset_root_is_exact(ws, tmp_path):
    assert ws.dataset_root(str(tmp_path / "set") + "/") == tmp_path / "set"
    assert ws.dataset_root(tmp_path / "set" / "sub" / "..") == tmp_path / "set"  # the same real folder
    (tmp_path / "set-evil").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "set", target_is_directory=True)
    assert ws.dataset_root(tmp_path / "alias") == tmp_path / "set"  # a link to it is the same folder
    for folder in (tmp_path / "set-evil", tmp_path, tmp_path / "SET", "set", tmp_path / "ws"):
        with pytest.raises(PathRefused):
            ws.dataset_root(folder)


def test_a_workspace_reached_through_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    ws = Workspace(tmp_path / "link")
    assert ws.root == tmp_path / "real"
    assert ws.resolve(str(tmp_path / "link" / "runs" / "x.png")) == tmp_path / "real" / "runs" / "x.png"
    with pytest.raises(PathRefused):
        ws.resolve(str(tmp_path / "link" / ".." / "x.png"))


def test_open_dataset_refuses_drives_and_home(ws, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for folder, message in (("/", "whole drive"), (str(home), "home folder"), ("~", "home folder"),
                            ("~no-such-user/x", "no such folder"), ("x\x00", "NUL"), ("relative", "full path")):
        with pytest.raises(ConjureError, match=message):
            ws.open_dataset(folder)
    (home / "pictures").mkdir()
    assert ws.open_dataset("~/pictures") == home / "pictures"  # the user typed it: ~ is their home here


def test_check_and_jsonl_do_not_read_files_linked_from_outside(setup):
    """issue 21, D8: check quoted the end of an over-long caption file linking out, and jsonl copied such
    captions and listed an image linking out. Both now treat them as the other endpoints do."""
    long_secret = " ".join(f"secretword{i}" for i in range(120))
    (setup.outside / "long_secret.txt").write_text(long_secret)
    _image(setup.folder / "d.png", (9, 9, 9))
    (setup.folder / "d.txt").symlink_to(setup.outside / "long_secret.txt")
    _image(setup.folder / "m.png", (7, 7, 7))
    (setup.folder / "m-masklabel.png").symlink_to(setup.outside / "secret.png")
    before = setup.guarded()
    client, folder = setup.client, str(setup.folder)
    answer = client.post("/api/datasets/check", json={"folder": folder})
    assert answer.status_code == 200
    assert b"secretword" not in answer.content and SECRET not in answer.content
    assert b"link.png" not in answer.content  # an image linking out is not listed, as in `images`
    problems = {Path(p["path"]).name: p["message"] for p in answer.json()["problems"] if p["kind"] == "missing_caption"}
    assert problems["c.png"] == problems["d.png"].replace("d.txt", "c.txt") == "caption file c.txt links outside the data set: not read"
    answer = client.post("/api/datasets/jsonl", json={"folder": folder, "out": "all.jsonl"})
    assert answer.status_code == 200
    written = (setup.folder / "all.jsonl").read_text()
    assert "secretword" not in written and SECRET.decode() not in written and "link.png" not in written
    lines = [json.loads(line) for line in written.splitlines()]
    assert {line["image"]: line["text"] for line in lines} == {
        "a.png": "a caption", "c.png": None, "d.png": None, "m.png": None, "~draft.png": None}
    assert setup.guarded() == before


def test_a_caption_linking_out_to_a_binary_file_does_not_break_the_listing(setup):
    """Listing once read every caption file, links pointing out included, before the gate dropped them: a link
    to a binary file outside made `images` and `tags` answer 400 naming that file."""
    (setup.outside / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    _image(setup.folder / "e.png", (5, 5, 5))
    (setup.folder / "e.txt").symlink_to(setup.outside / "blob.bin")
    for endpoint in ("images", "tags"):
        answer = setup.client.get(f"/api/datasets/{endpoint}", params={"folder": str(setup.folder)})
        assert answer.status_code == 200 and b"blob.bin" not in answer.content, answer.text
