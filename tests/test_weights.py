"""UniverSeg weights: lookup order, loading checks and a failure-safe download.

Every network call here goes to a server on this machine's loopback; a guard
fails any test that tries to reach another host.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from spe import weights
from spe.errors import SPEError
from spe.segmenters.universeg import state_dict_shapes

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN_WEIGHTS = SHARED / "fixtures" / "universeg" / "universeg_golden_weights.pt"
LOOPBACK = ("127.0.0.1", "localhost", "::1")

# Short enough to keep the suite fast, long enough for a loaded CI machine.
TIMEOUT_S = 1.0


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch, tmp_path):
    """A fresh cache, no weights variable, no proxies, and loopback only."""
    monkeypatch.setenv("SPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SPE_UNIVERSEG_WEIGHTS", raising=False)
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)

    connect = socket.create_connection

    def loopback_only(address, *args, **kwargs):
        assert address[0] in LOOPBACK, f"test tried to reach {address[0]}"
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", loopback_only)


def files_under(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*") if path.is_file())


# ---------------------------------------------------------------------------
# Finding the weights


def test_explicit_path_wins_over_environment_and_cache(monkeypatch, tmp_path):
    explicit, from_environment = tmp_path / "explicit.pt", tmp_path / "env.pt"
    for path in (explicit, from_environment, weights.cached_weights_path()):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    monkeypatch.setenv("SPE_UNIVERSEG_WEIGHTS", str(from_environment))

    assert weights.resolve_weights(explicit) == explicit
    assert weights.resolve_weights() == from_environment
    monkeypatch.delenv("SPE_UNIVERSEG_WEIGHTS")
    assert weights.resolve_weights() == weights.cached_weights_path()
    assert weights.find_weights().source == "cache"


def test_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SPE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.cache_dir() == tmp_path / "xdg" / "spe"

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights.cache_dir() == tmp_path / "home" / ".cache" / "spe"


def test_no_weights_anywhere_names_the_three_ways():
    assert weights.find_weights() is None

    with pytest.raises(SPEError) as raised:
        weights.resolve_weights()

    message = str(raised.value)
    assert "\n" not in message
    assert "--universeg-weights PATH" in message
    assert "SPE_UNIVERSEG_WEIGHTS" in message
    assert str(weights.cache_dir()) in message
    assert weights.RELEASE_URL in message
    assert "OpenRAIL++-M" in message


def test_a_named_file_that_is_missing_is_an_error_naming_it(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(
        SPEError, match=f"{missing}.*--universeg-weights.*does not exist"
    ):
        weights.resolve_weights(missing)

    monkeypatch.setenv("SPE_UNIVERSEG_WEIGHTS", str(missing))
    with pytest.raises(SPEError, match=f"{missing}.*SPE_UNIVERSEG_WEIGHTS"):
        weights.resolve_weights()


def test_info_reports_where_the_weights_are_and_the_licence(monkeypatch):
    missing = weights.weights_info()
    assert missing.splitlines()[0] == "UniverSeg weights: not found"
    assert "OpenRAIL++-M" in missing
    assert "SPE_UNIVERSEG_WEIGHTS: not set" in missing

    monkeypatch.setenv("SPE_UNIVERSEG_WEIGHTS", str(GOLDEN_WEIGHTS))
    found = weights.weights_info()
    digest = hashlib.sha256(GOLDEN_WEIGHTS.read_bytes()).hexdigest()
    assert found.splitlines()[0].startswith(f"UniverSeg weights: {GOLDEN_WEIGHTS}")
    assert digest in found
    assert weights.weights_status()["found"] is True


# ---------------------------------------------------------------------------
# Loading


def test_golden_weights_load_with_the_official_shapes():
    state = weights.load_state_dict(GOLDEN_WEIGHTS, state_dict_shapes())

    assert len(state) == len(state_dict_shapes())


@pytest.mark.parametrize(
    ("corrupt", "fragment"),
    [
        (
            lambda state: state.pop("out_conv.conv.bias"),
            "missing key out_conv.conv.bias",
        ),
        (
            lambda state: state.update(extra=torch.zeros(1)),
            "unexpected key extra",
        ),
        (
            lambda state: state.update(
                {"dec_blocks.2.cross.cross_conv.weight": torch.zeros(64, 128, 3, 3)}
            ),
            "dec_blocks.2.cross.cross_conv.weight has shape (64, 128, 3, 3) but "
            "UniverSeg expects (64, 256, 3, 3)",
        ),
    ],
)
def test_a_state_dict_that_differs_is_named(tmp_path, corrupt, fragment):
    state = torch.load(GOLDEN_WEIGHTS, map_location="cpu", weights_only=True)
    corrupt(state)
    path = tmp_path / "changed.pt"
    torch.save(state, path)

    with pytest.raises(SPEError) as raised:
        weights.load_state_dict(path, state_dict_shapes())

    assert fragment in str(raised.value)
    assert str(path) in str(raised.value)


def test_files_that_are_not_state_dicts_are_user_errors(tmp_path):
    text = tmp_path / "page.html"
    text.write_text("<html>not found</html>")
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)

    with pytest.raises(SPEError, match="not a PyTorch weights file"):
        weights.load_state_dict(text, state_dict_shapes())
    with pytest.raises(SPEError, match="holds a Tensor, not a state dict"):
        weights.load_state_dict(tensor, state_dict_shapes())


# ---------------------------------------------------------------------------
# Downloading, from servers on the loopback only


@contextlib.contextmanager
def loopback_server(respond: Callable[[http.server.BaseHTTPRequestHandler], None]):
    """An HTTP server on 127.0.0.1 that answers every GET with ``respond``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            respond(self)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{weights.FILE_NAME}"
    finally:
        server.shutdown()
        server.server_close()


def send(body: bytes, *, status: int = 200, claimed_length: int | None = None):
    def respond(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Length", str(claimed_length or len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return respond


def test_download_writes_the_file_atomically_and_reports_it(tmp_path):
    body = GOLDEN_WEIGHTS.read_bytes()
    destination = tmp_path / "cache"
    destination.mkdir()

    with loopback_server(send(body)) as url:
        downloaded = weights.download_weights(
            url, destination, timeout_s=TIMEOUT_S, progress=False
        )

    assert downloaded.path == destination / weights.FILE_NAME
    assert downloaded.size_bytes == len(body)
    assert downloaded.sha256 == hashlib.sha256(body).hexdigest()
    assert files_under(tmp_path) == [downloaded.path]
    assert downloaded.path.read_bytes() == body


@pytest.mark.parametrize(
    ("respond", "fragment"),
    [
        (send(b"missing", status=404), "HTTP 404"),
        (
            send(b"<html>sign in</html>"),
            "downloaded from .* is not a PyTorch weights file",
        ),
        (send(b"x" * 1000, claimed_length=5000), "stopped after 1000 of 5000 bytes"),
    ],
)
def test_a_failed_download_leaves_no_file(tmp_path, respond, fragment):
    destination = tmp_path / "weights.pt"

    with loopback_server(respond) as url, pytest.raises(SPEError, match=fragment):
        weights.download_weights(url, destination, timeout_s=TIMEOUT_S, progress=False)

    assert files_under(tmp_path) == []


def closed_port() -> int:
    """A loopback port nothing listens on: connections to it are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port whose connections hang, like an unroutable address.

    The listener never accepts and its queue is filled first, so the kernel
    drops further connection attempts instead of refusing them.
    """
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(8):
            filler = stack.enter_context(socket.socket())
            filler.settimeout(0.2)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        yield port


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A loopback port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        yield listener.getsockname()[1]


def refused() -> contextlib.AbstractContextManager[int]:
    return contextlib.nullcontext(closed_port())


@pytest.mark.parametrize(
    ("port_context", "fragment"),
    [
        (refused, "Connection refused"),
        (unanswered_port, "timed out"),
        (silent_server, "timed out"),
    ],
)
def test_an_unreachable_server_fails_fast_and_leaves_no_file(
    tmp_path, port_context, fragment
):
    destination = tmp_path / "weights.pt"

    with port_context() as port:
        url = f"http://127.0.0.1:{port}/{weights.FILE_NAME}"
        started = time.perf_counter()
        with pytest.raises(SPEError) as raised:
            weights.download_weights(
                url, destination, timeout_s=TIMEOUT_S, progress=False
            )
        elapsed = time.perf_counter() - started

    message = str(raised.value)
    assert message.startswith(f"could not reach {url}")
    assert fragment in message
    assert "--universeg-weights" in message
    assert elapsed < TIMEOUT_S + 2
    assert files_under(tmp_path) == []


def test_only_http_urls_are_downloaded(tmp_path):
    with pytest.raises(SPEError, match="http or https"):
        weights.download_weights(f"file://{GOLDEN_WEIGHTS}", tmp_path / "w.pt")
