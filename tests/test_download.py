"""bnlab.data downloads, against a local HTTP server serving the real MNIST files.

Nothing here reaches the internet: every mirror is http://127.0.0.1:<ephemeral port>/<mode>/,
where <mode> picks the server's behaviour (good, truncated, short, wrong, 404, 500, slow).
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bnlab import data
from bnlab.data import FILES, DataError

# The vendored canonical files (byte-identical to /work/shared/data/mnist).
MNIST_DIR = Path(__file__).resolve().parents[1] / "src" / "bnlab" / "_data" / "mnist"
BODIES = {fname: (MNIST_DIR / fname).read_bytes() for fname in FILES.values()}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        mode, _, fname = self.path.strip("/").partition("/")
        if fname not in BODIES or mode in ("404", "500"):
            self.send_error(404 if mode != "500" else 500)
            return
        body = BODIES[fname]
        announced = len(body)
        if mode == "truncated":  # a consistent but cut-down file
            body = body[: len(body) // 2]
            announced = len(body)
        elif mode == "short":  # announces the full length, then hangs up halfway
            body = body[: len(body) // 2]
        elif mode == "wrong":  # a real IDX file, but not the one asked for
            other = FILES["test_labels"] if fname != FILES["test_labels"] else FILES["train_labels"]
            body = BODIES[other]
            announced = len(body)
        elif mode == "slow":
            time.sleep(1.0)
        elif mode != "good":
            self.send_error(400)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up (timeout test)

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.url = lambda mode: f"{base}/{mode}/"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(isolated_data_env, tmp_path, monkeypatch):
    """An empty user cache, with no vendored, system or user-configured copy to find."""
    monkeypatch.setattr(data, "VENDORED_ROOT", tmp_path / "no-vendored")
    return tmp_path / "xdg" / "bnlab" / "mnist"


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return f"http://127.0.0.1:{port}/mnist/"


def assert_clean(root: Path) -> None:
    """No dataset file and no temp file anywhere under the cache root."""
    leftovers = [p for p in root.rglob("*") if p.is_file()]
    assert leftovers == []


def assert_complete(cache: Path) -> None:
    assert sorted(p.name for p in cache.iterdir()) == sorted(FILES.values())
    for fname in FILES.values():
        assert data.sha256_file(cache / fname) == data.SHA256["mnist"][fname]


def one_paragraph(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_download_into_empty_cache(server, cache):
    assert not cache.exists()
    found = data.find_data_dir("mnist", mirrors=[server.url("good")])
    assert found == cache
    assert_complete(cache)
    assert sorted(server.requests) == sorted(f"/good/{f}" for f in FILES.values())
    ds = data.load_mnist(mirrors=[server.url("good")])
    assert ds.source == str(cache) and ds.train_labels[0] == 5 and ds.test_labels[0] == 7
    assert len(server.requests) == 4  # the second call found the cache


def test_env_mirrors_and_retry_after_404(server, cache, monkeypatch):
    monkeypatch.setenv("BNLAB_MNIST_MIRRORS", f"{server.url('404')} , {server.url('good')}")
    assert data.find_data_dir("mnist") == cache
    assert_complete(cache)
    for fname in FILES.values():
        i = server.requests.index(f"/404/{fname}")
        assert server.requests[i + 1] == f"/good/{fname}"


def test_500_then_good_mirror_without_trailing_slash(server, cache):
    mirrors = [server.url("500"), server.url("good").rstrip("/")]
    assert data.find_data_dir("mnist", mirrors=mirrors) == cache
    assert_complete(cache)
    assert server.requests[0].startswith("/500/")


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("truncated", "sha256 mismatch"),  # consistent headers, half the bytes
        ("short", "truncated: received"),  # connection closed before Content-Length
        ("wrong", "sha256 mismatch"),  # another real file
        ("404", "HTTP 404"),
    ],
)
def test_single_bad_mirror_leaves_cache_clean(server, cache, tmp_path, mode, expected):
    with pytest.raises(DataError) as exc:
        data.find_data_dir("mnist", mirrors=[server.url(mode)])
    msg = one_paragraph(exc)
    assert expected in msg and server.url(mode) in msg and str(cache) in msg
    assert_clean(tmp_path / "xdg")


@pytest.mark.parametrize("mode", ["truncated", "short", "wrong"])
def test_bad_answer_then_good_mirror(server, cache, mode):
    assert data.find_data_dir("mnist", mirrors=[server.url(mode), server.url("good")]) == cache
    assert_complete(cache)  # also: no .part files left beside the good ones


def test_all_mirrors_fail_lists_each(server, cache, tmp_path):
    refused = closed_port_url()
    mirrors = [server.url("404"), server.url("500"), refused, server.url("wrong")]
    with pytest.raises(DataError) as exc:
        data.find_data_dir("mnist", mirrors=mirrors)
    msg = one_paragraph(exc)
    first = FILES["train_images"]
    assert f"{server.url('404')}{first}: HTTP 404" in msg
    assert f"{server.url('500')}{first}: HTTP 500" in msg
    assert f"{refused}{first}: " in msg and "refused" in msg.lower()
    assert f"{server.url('wrong')}{first}: sha256 mismatch" in msg
    assert "BNLAB_MNIST_MIRRORS" in msg and "--data-dir" in msg
    assert_clean(tmp_path / "xdg")


def test_timeout(server, cache, tmp_path):
    start = time.monotonic()
    with pytest.raises(DataError, match="timed out"):
        data.find_data_dir("mnist", mirrors=[server.url("slow")], timeout=0.2)
    assert time.monotonic() - start < 1.0
    assert_clean(tmp_path / "xdg")


def test_no_download_means_no_request(server, cache):
    with pytest.raises(DataError, match="downloading is disabled"):
        data.find_data_dir("mnist", download=False, mirrors=[server.url("good")])
    assert server.requests == []


def test_empty_mirror_list(cache):
    with pytest.raises(DataError, match="no download mirror"):
        data.find_data_dir("mnist", mirrors=[])


def test_partial_cache_fetches_only_missing(server, cache):
    cache.mkdir(parents=True)
    for key in ("train_images", "train_labels"):
        shutil.copyfile(MNIST_DIR / FILES[key], cache / FILES[key])
    assert data.find_data_dir("mnist", mirrors=[server.url("good")]) == cache
    assert sorted(server.requests) == sorted(f"/good/{FILES[k]}" for k in ("test_images", "test_labels"))
    assert_complete(cache)


def test_corrupt_cached_file_says_delete_and_rerun(server, cache):
    cache.mkdir(parents=True)
    for fname in FILES.values():
        shutil.copyfile(MNIST_DIR / fname, cache / fname)
    target = cache / FILES["train_labels"]
    blob = bytearray(target.read_bytes())
    blob[50] ^= 0x10
    target.write_bytes(bytes(blob))
    with pytest.raises(DataError) as exc:
        data.load_mnist(mirrors=[server.url("good")])
    msg = one_paragraph(exc)
    assert str(target) in msg and "Delete it and rerun" in msg
    assert server.requests == []  # a bad cached file is reported, not silently replaced


def test_fashion_mnist_rejects_mnist_bytes(server, cache, tmp_path, monkeypatch):
    # We have no Fashion-MNIST files: a mirror serving MNIST under those names must fail.
    monkeypatch.setenv("BNLAB_FASHION_MNIST_MIRRORS", server.url("good"))
    with pytest.raises(DataError) as exc:
        data.load_dataset("fashion-mnist")
    msg = one_paragraph(exc)
    assert "Fashion-MNIST" in msg and "sha256 mismatch" in msg
    assert str(tmp_path / "xdg" / "bnlab" / "fashion-mnist") in msg
    assert_clean(tmp_path / "xdg")


def test_unwritable_cache_is_a_data_error(server, cache, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.raises(DataError, match="cannot write the MNIST download cache"):
        data.find_data_dir("mnist", mirrors=[server.url("good")])
    assert server.requests == []


def test_a_download_is_announced_and_shows_its_progress_on_stderr(server, cache, capsys):
    data.find_data_dir("mnist", mirrors=[server.url("good")])
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout may hold a --json result
    first = captured.err.splitlines()[0]
    assert first.startswith("bnlab: MNIST is not in ") and f"into {cache} (verified by sha256)" in first
    # One tqdm bar per file, each ending at 100% of the announced size.
    finals = [line.rsplit("\r", 1)[-1] for line in captured.err.splitlines()[1:]]
    for fname in FILES.values():
        assert any(line.startswith(fname) and "100%" in line for line in finals), (fname, finals)
