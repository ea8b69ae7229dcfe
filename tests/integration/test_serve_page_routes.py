"""The web page's routes in this process: ``/`` and its static files (types, headers, nothing fetched
from elsewhere, all shipped in the wheel) and ``GET /v1/sources`` (bounded, relative names, no way
out of the allowed directories, hostile names). The page itself runs in a real browser in
``tests/e2e/test_serve_page.py``.
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mukv.serve import ServeConfig, create_app, page
from mukv.serve.errors import ApiError
from mukv.serve.sources import parse_source

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

TOKEN = "page-routes-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 60.0


def touch(path: Path, data: bytes = b"\x00" * 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path) -> tuple[Path, Path, Path]:
    """Two allowed directories and one outside them, with files a listing must and must not show."""
    first, second, outside = tmp_path / "first", tmp_path / "second", tmp_path / "outside"
    touch(first / "walk.mp4", b"w" * 10)
    touch(first / "sub" / "drive.MKV")
    touch(first / "<script>alert(1)</script> & more.webm")
    touch(first / "notes.txt")  # not a video
    touch(first / ".hidden.mp4")
    touch(first / ".cache" / "inside-hidden.mp4")
    touch(first / "line\nbreak.mp4")  # a control character: not listable as text
    touch(first / "evil\u202egpm.mp4")  # a right-to-left override (a format character): shown reversed
    deep = first.joinpath(*[f"d{level}" for level in range(page.MAX_DEPTH + 1)])
    touch(deep.parent / "deepest-listed.mp4")
    touch(deep / "too-deep.mp4")
    touch(outside / "secret.mp4")
    (first / "escape.mp4").symlink_to(outside / "secret.mp4")  # a link out: not listed
    (first / "linked-dir").symlink_to(outside, target_is_directory=True)  # not followed
    (first / "alias.mp4").symlink_to(first / "walk.mp4")  # a link inside: listed
    touch(second / "walk.mp4", b"x" * 99)  # shadowed: "walk.mp4" plays the first directory's
    touch(second / "other.mov")
    if sys.platform != "darwin":  # macOS refuses names that are not UTF-8
        touch(Path(os.fsdecode(bytes(second) + b"/caf\xe9.mp4")))  # Latin-1 bytes: not UTF-8
    return first, second, outside


def names(listing: page.Listing) -> list[str]:
    return [file["name"] for file in listing.files]


def test_the_listing_shows_playable_videos_by_relative_name(tree):
    first, second, _ = tree
    config = ServeConfig(model="mukv-tiny", allow_dirs=(first, second))
    listing = page.list_sources(config)
    deepest = "/".join(f"d{level}" for level in range(page.MAX_DEPTH)) + "/deepest-listed.mp4"
    assert names(listing) == sorted(
        ["<script>alert(1)</script> & more.webm", "alias.mp4", deepest, "other.mov", "sub/drive.MKV", "walk.mp4"]
    )
    assert not listing.truncated
    assert {file["name"]: file["size"] for file in listing.files}["walk.mp4"] == 10  # the first directory's
    # Every listed name is a source the server takes, and plays the file listed.
    for file in listing.files:
        spec = parse_source(file["name"], config)
        assert spec.kind == "file" and spec.path.stat().st_size == file["size"]
        assert spec.path.is_relative_to(first) or spec.path.is_relative_to(second)


def test_the_listing_is_bounded(tree, monkeypatch):
    first, second, _ = tree
    config = ServeConfig(model="mukv-tiny", allow_dirs=(first, second))
    monkeypatch.setattr(page, "MAX_SOURCES", 2)
    listing = page.list_sources(config)
    assert len(listing.files) == 2 and listing.truncated
    monkeypatch.setattr(page, "MAX_SOURCES", 500)
    monkeypatch.setattr(page, "MAX_ENTRIES_SCANNED", 3)
    listing = page.list_sources(config)
    assert len(listing.files) <= 3 and listing.truncated


def test_the_listing_of_a_server_without_allowed_directories_is_empty():
    assert page.list_sources(ServeConfig(model="mukv-tiny")).to_json() == {
        "object": "list",
        "data": [],
        "truncated": False,
    }


@pytest.fixture(scope="module")
def allowed(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("page-allowed")
    touch(directory / "clip.mp4")
    touch(directory / '"><img src=x onerror=alert(1)>.mp4')
    touch(directory.parent / "page-outside.mp4")
    return directory


@pytest.fixture(scope="module")
def client(tiny_model_dir, allowed) -> Iterator[TestClient]:
    config = ServeConfig(model=str(tiny_model_dir), model_name="tiny", token=TOKEN, allow_dirs=(allowed,))
    with TestClient(create_app(config)) as test_client:
        yield test_client


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + DEADLINE
    while client.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.05)


def test_the_page_and_its_files_are_served_with_their_types(client):
    response = client.get("/")  # no token: the page holds no data
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    html = response.text
    referenced = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sorted(referenced) == ["/static/app.js", "/static/style.css"]
    types = {".js": "text/javascript", ".css": "text/css"}
    for path in referenced:
        served = client.get(path)
        assert served.status_code == 200, path
        assert served.headers["content-type"].startswith(types[Path(path).suffix]), served.headers
        assert served.content == (page.STATIC_DIR / Path(path).name).read_bytes()
        # Each file with the page's headers: nothing is ever taken for another type.
        for name, value in page.PAGE_HEADERS.items():
            assert served.headers[name] == value, (path, name)
    head = client.head("/")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-security-policy"] == policy


@pytest.mark.parametrize("path", ["/static/index.html", "/static/./index.html", "/static/sub/../index.html"])
def test_the_page_is_served_only_at_its_own_address(client, path):
    """Under /static the page would be served without its own headers (its content security policy):
    it is not there."""
    response = client.get(path)
    assert response.status_code == 404, response.headers
    assert response.json()["error"]["code"] == "not_found"


def test_the_page_fetches_nothing_from_elsewhere():
    """Offline: no absolute URL in the page's files (its requests are relative to its own server);
    an example shown in an empty field is no request."""
    for file in page.STATIC_DIR.iterdir():
        text = re.sub(r'placeholder="[^"]*"', "", file.read_text())
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), file.name
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "document.write" not in text


def test_every_static_file_ships_in_the_wheel():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["mukv.serve"]
    for file in page.STATIC_DIR.iterdir():
        relative = f"static/{file.name}"
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative


@pytest.mark.parametrize(
    "path",
    [
        "/static/%2e%2e/page.py",  # reaches the app as /static/../page.py (a plain ".." the client resolves)
        "/static/..%2fpage.py",
        "/static/%2e%2e%2fapp.py",
        "/static/nope.js",
    ],
)
def test_static_paths_stay_in_the_static_directory(client, path):
    response = client.get(path)
    assert response.status_code == 404, (path, response.text[:200])
    assert response.json()["error"]["code"] == "not_found"
    assert "import" not in response.text


def test_sources_need_the_token_and_list_names_as_data(client, allowed):
    wait_ready(client)
    refused = client.get("/v1/sources")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    response = client.get("/v1/sources", headers=AUTH)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert response.json() == {
        "object": "list",
        "data": [
            {"name": '"><img src=x onerror=alert(1)>.mp4', "size": 16},
            {"name": "clip.mp4", "size": 16},
        ],
        "truncated": False,
    }
    # What the page sends back is checked again by the stream request: a name can't reach out.
    config = client.app.state.mukv.config
    for escape in ("../page-outside.mp4", str(allowed.parent / "page-outside.mp4"), "clip.mp4/../../page-outside.mp4"):
        with pytest.raises(ApiError) as refused_source:
            parse_source(escape, config)
        assert refused_source.value.code == "source_not_allowed", escape
