"""Multi30k checksums, the mocked download path (atomic, verified, locked) and data-root resolution."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError

import pytest
import torch.hub

from lightning_moe.data import download as dl

MULTI30K = Path(os.environ.get("MULTI30K_ROOT", Path(__file__).resolve().parents[2].parent / "shared/data/multi30k"))


class FakeResponse(io.BytesIO):
    """What ``urlopen`` returns, enough for ``torch.hub.download_url_to_file``."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.headers = Message()
        self.headers["Content-Length"] = str(len(data))

    def info(self) -> Message:
        return self.headers


class FakeServer:
    """Serves ``files`` (name -> bytes) like GitHub raw; records the requested URLs.

    ``download`` stands in for ``torch.hub.download_url_to_file`` and ``urlopen`` for the ``urlopen`` it
    calls (to run the real downloader against this server).
    """

    def __init__(self, files: dict[str, bytes], fail_first: int = 0) -> None:
        self.files, self.fail_left = files, fail_first
        self.requests: list[str] = []
        self.stop_after: int | None = None  # cut the body after this many bytes (a dropped connection)

    def _body(self, url: str) -> bytes:
        self.requests.append(url)
        if self.fail_left:
            self.fail_left -= 1
            raise URLError("connection reset")
        name = url.rsplit("/", 1)[-1]
        if name not in self.files:
            raise HTTPError(url, 404, "Not Found", Message(), None)
        data = self.files[name]
        if self.stop_after is not None:
            data, self.stop_after = data[: self.stop_after], None
        return data

    def download(self, url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        data = self._body(url)
        Path(dst).write_bytes(data)

    def urlopen(self, request: Any, timeout: float = 0) -> FakeResponse:
        return FakeResponse(self._body(request.full_url))


@pytest.fixture
def payload() -> tuple[bytes, str, int]:
    data = bytes(range(256)) * 700  # > one read chunk
    return data, hashlib.sha256(data).hexdigest(), len(data)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(dl, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "urlopen", refuse)
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)


def test_real_downloader_against_a_fake_server(monkeypatch, tmp_path, payload) -> None:
    data, sha, size = payload
    server = FakeServer({"f.bin": data})
    monkeypatch.setattr(dl, "download_url_to_file", torch.hub.download_url_to_file)
    monkeypatch.setattr(torch.hub, "urlopen", server.urlopen)
    out = dl.download_file("https://host/f.bin", tmp_path / "f.bin", sha, size)
    assert out.read_bytes() == data and server.requests == ["https://host/f.bin"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["f.bin"]  # no temporary files left
    server.stop_after = 1000  # a connection that drops: torch.hub keeps the short body, the checksum catches it
    with pytest.raises(dl.ChecksumError):
        dl.download_file("https://host/f.bin", tmp_path / "g.bin", sha, size)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["f.bin"]


def test_embedded_checksums_match_the_shared_files() -> None:
    if not (MULTI30K / "train.en.gz").is_file():
        pytest.skip(f"no Multi30k copy at {MULTI30K} (set MULTI30K_ROOT)")
    local = sorted(p.name for p in MULTI30K.glob("*.gz"))
    assert local == sorted(dl.MULTI30K_FILES)
    for name, (sha256, size) in dl.MULTI30K_FILES.items():
        path = MULTI30K / name
        assert path.stat().st_size == size, name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256, name


def test_download_writes_verified_file(monkeypatch, tmp_path, payload) -> None:
    data, sha, size = payload
    server = FakeServer({"f.bin": data})
    monkeypatch.setattr(dl, "download_url_to_file", server.download)
    out = dl.download_file("https://host/f.bin", tmp_path / "sub" / "f.bin", sha, size)
    assert out.read_bytes() == data
    assert not (tmp_path / "sub" / "f.bin.part").exists()
    # a verified file is not fetched again
    dl.download_file("https://host/f.bin", out, sha, size)
    assert len(server.requests) == 1


def test_checksum_mismatch_raises_and_removes_the_download(monkeypatch, tmp_path, payload) -> None:
    data, sha, size = payload
    corrupt = bytearray(data)
    corrupt[100] ^= 1
    monkeypatch.setattr(dl, "download_url_to_file", FakeServer({"f.bin": bytes(corrupt)}).download)
    with pytest.raises(dl.ChecksumError, match="does not match its checksum"):
        dl.download_file("https://host/f.bin", tmp_path / "f.bin", sha, size)
    assert [p for p in tmp_path.iterdir() if p.is_file()] == []  # neither the final name nor the .part file


def test_write_is_atomic_when_the_connection_drops(monkeypatch, tmp_path, payload) -> None:
    data, sha, size = payload
    server = FakeServer({"f.bin": data})
    server.stop_after = 1000  # the first response ends early
    monkeypatch.setattr(dl, "download_url_to_file", server.download)
    with pytest.raises(dl.ChecksumError):
        dl.download_file("https://host/f.bin", tmp_path / "f.bin", sha, size)
    assert not (tmp_path / "f.bin").exists()  # never a half-written file under the final name


def test_stale_partial_file_is_replaced(monkeypatch, tmp_path, payload) -> None:
    data, sha, size = payload
    (tmp_path / "f.bin.part").write_bytes(b"garbage" * 10)  # left by a killed download
    server = FakeServer({"f.bin": data})
    monkeypatch.setattr(dl, "download_url_to_file", server.download)
    assert dl.download_file("https://host/f.bin", tmp_path / "f.bin", sha, size).read_bytes() == data
    assert server.requests == ["https://host/f.bin"] and not (tmp_path / "f.bin.part").exists()


def test_corrupt_existing_file_is_replaced(monkeypatch, tmp_path, payload) -> None:
    data, sha, size = payload
    (tmp_path / "f.bin").write_bytes(b"old and wrong")
    monkeypatch.setattr(dl, "download_url_to_file", FakeServer({"f.bin": data}).download)
    assert dl.download_file("https://host/f.bin", tmp_path / "f.bin", sha, size).read_bytes() == data


def test_transient_errors_are_retried_and_404_is_not(monkeypatch, tmp_path, payload) -> None:
    data, sha, size = payload
    server = FakeServer({"f.bin": data}, fail_first=2)
    monkeypatch.setattr(dl, "download_url_to_file", server.download)
    dl.download_file("https://host/f.bin", tmp_path / "f.bin", sha, size, retries=3)
    assert len(server.requests) == 3
    monkeypatch.setattr(dl, "download_url_to_file", FakeServer({"g": data}, fail_first=5).download)
    with pytest.raises(OSError, match="after 2 attempts .*check the network connection"):
        dl.download_file("https://host/g", tmp_path / "g", sha, size, retries=2)
    missing = FakeServer({})
    monkeypatch.setattr(dl, "download_url_to_file", missing.download)
    with pytest.raises(OSError, match="HTTP 404"):
        dl.download_file("https://host/h", tmp_path / "h", sha, size, retries=3)
    assert len(missing.requests) == 1


def _fake_multi30k(monkeypatch: pytest.MonkeyPatch, names: list[str]) -> FakeServer:
    files = {name: f"content of {name}\n".encode() for name in names}
    table = {name: (hashlib.sha256(b).hexdigest(), len(b)) for name, b in files.items()}
    monkeypatch.setattr(dl, "MULTI30K_FILES", table)
    server = FakeServer(files)
    monkeypatch.setattr(dl, "download_url_to_file", server.download)
    return server


def test_resolve_downloads_missing_files_into_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(dl.DATA_ENV, raising=False)
    names = ["train.en.gz", "train.de.gz", "train.fr.gz", "val.en.gz", "val.de.gz"]
    server = _fake_multi30k(monkeypatch, names)
    root = dl.resolve_data_root(None, tmp_path, langs=["en", "de"], splits=["train"])
    assert root == tmp_path / "multi30k"
    assert sorted(p.name for p in root.iterdir() if p.is_file()) == ["train.de.gz", "train.en.gz"]
    assert all(url.startswith(dl.BASE_URL) for url in server.requests)
    # second call: everything verified locally, nothing fetched
    before = len(server.requests)
    assert dl.resolve_data_root(None, tmp_path, langs=["en", "de"], splits=["train"]) == root
    assert len(server.requests) == before


def test_resolve_without_download_lists_missing(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(dl.DATA_ENV, raising=False)
    _fake_multi30k(monkeypatch, ["train.en.gz", "val.en.gz"])
    with pytest.raises(ValueError, match=r"download=False .*train\.en\.gz"):
        dl.resolve_data_root(None, tmp_path, download=False, langs=["en"], splits=["train"])


def test_resolve_prefers_root_then_env(monkeypatch, tmp_path) -> None:
    given = tmp_path / "mine"
    given.mkdir()
    env = tmp_path / "env"
    env.mkdir()
    monkeypatch.setenv(dl.DATA_ENV, str(env))
    assert dl.resolve_data_root(given, tmp_path / "cache") == given
    assert dl.resolve_data_root(None, tmp_path / "cache") == env
    with pytest.raises(ValueError, match=r"root=.*is not a folder"):
        dl.resolve_data_root(tmp_path / "missing", tmp_path / "cache")
    monkeypatch.setenv(dl.DATA_ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="LIGHTNING_MOE_DATA"):
        dl.resolve_data_root(None, tmp_path / "cache")


def test_file_selection_validates() -> None:
    assert dl.multi30k_files(["cs"], ["test_2017_flickr"]) == []
    assert dl.multi30k_files(["en"], ["val", "train"]) == ["train.en.gz", "val.en.gz"]
    with pytest.raises(ValueError, match="langs=.*'xx'"):
        dl.multi30k_files(["xx"])
    with pytest.raises(ValueError, match="splits=.*'dev'"):
        dl.multi30k_files(None, ["dev"])


def test_concurrent_downloads_fetch_once(monkeypatch, tmp_path, payload) -> None:
    data, sha, size = payload
    server = FakeServer({"f.bin": data})
    fast = server.download

    def slow_download(*args, **kwargs):
        time.sleep(0.2)  # long enough for the second thread to arrive while the first holds the lock
        return fast(*args, **kwargs)

    monkeypatch.setattr(dl, "download_url_to_file", slow_download)
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            dl.download_file("https://host/f.bin", tmp_path / "f.bin", sha, size)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(server.requests) == 1
    assert (tmp_path / "f.bin").read_bytes() == data
