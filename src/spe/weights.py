"""UniverSeg's official weights: where they are looked up, downloaded and loaded.

SPE never ships the weights: they are licensed OpenRAIL++-M (research use only)
and published as a release asset of the GitHub project JJGO/UniverSeg. They are
looked up, in this order:

1. a path given explicitly (``--universeg-weights PATH``, or ``weights=PATH``);
2. the environment variable ``SPE_UNIVERSEG_WEIGHTS``;
3. the user cache: ``$SPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/spe``, else
   ``~/.cache/spe``, holding a file named :data:`FILE_NAME`.

Nothing here touches the network except :func:`download_weights`, which runs
only when the user asks for it.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from tqdm import tqdm

from spe.errors import SPEError

logger = logging.getLogger(__name__)

FILE_NAME = "universeg_v1_nf64_ss64_STA.pt"
RELEASE_URL = f"https://github.com/JJGO/UniverSeg/releases/download/weights/{FILE_NAME}"
LICENSE_NOTE = (
    "the UniverSeg weights are licensed OpenRAIL++-M: research use only; "
    "SPE does not ship them"
)

WEIGHTS_ENV = "SPE_UNIVERSEG_WEIGHTS"
CACHE_DIR_ENV = "SPE_CACHE_DIR"
WEIGHTS_FLAG = "--universeg-weights"
DOWNLOAD_COMMAND = "spe weights download"

#: Seconds to wait for a connection or for the next block of data.
DEFAULT_TIMEOUT_S = 15.0

_CHUNK_BYTES = 1 << 16


# ---------------------------------------------------------------------------
# Finding the weights


@dataclass(frozen=True)
class WeightsLocation:
    """Where the weights are, and which of the three ways gave that place.

    Attributes:
        path: the weights file (it may not exist for an argument or an
            environment variable that names a missing file).
        source: how the path was given: "argument", "environment" or "cache".
    """

    path: Path
    source: Literal["argument", "environment", "cache"]

    @property
    def exists(self) -> bool:
        """Whether a file is at ``path``."""
        return self.path.is_file()

    def describe(self) -> str:
        """How the path was given, in words."""
        return {
            "argument": f"given with {WEIGHTS_FLAG}",
            "environment": f"from {WEIGHTS_ENV}",
            "cache": "from the cache directory",
        }[self.source]


def cache_dir() -> Path:
    """The directory SPE caches downloads in (it may not exist yet)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "spe"
    return Path.home() / ".cache" / "spe"


def cached_weights_path() -> Path:
    """Where :func:`download_weights` puts the weights by default."""
    return cache_dir() / FILE_NAME


def find_weights(path: str | os.PathLike[str] | None = None) -> WeightsLocation | None:
    """The first way the weights are given, or None when none is.

    An explicit ``path`` wins, then ``$SPE_UNIVERSEG_WEIGHTS``, then the cache
    file. A path given either of the first two ways is returned even when no
    file is there, so that the caller can say which setting is wrong.
    """
    if path is not None:
        return WeightsLocation(Path(path).expanduser(), "argument")
    if os.environ.get(WEIGHTS_ENV):
        return WeightsLocation(
            Path(os.environ[WEIGHTS_ENV]).expanduser(), "environment"
        )
    cached = cached_weights_path()
    if cached.is_file():
        return WeightsLocation(cached, "cache")
    return None


def missing_weights_message() -> str:
    """The one-line error for no weights, naming the three ways to give them."""
    return (
        f"UniverSeg weights not found; pass {WEIGHTS_FLAG} PATH, set {WEIGHTS_ENV}"
        f"=PATH, or put {FILE_NAME} in {cache_dir()} (`{DOWNLOAD_COMMAND}` "
        f"fetches it from {RELEASE_URL}; {LICENSE_NOTE})"
    )


def resolve_weights(path: str | os.PathLike[str] | None = None) -> Path:
    """The weights file to load; raises SPEError when there is none.

    Args:
        path: an explicit weights file; when given it must exist.
    """
    location = find_weights(path)
    if location is None:
        raise SPEError(missing_weights_message())
    if not location.exists:
        setting = WEIGHTS_FLAG if location.source == "argument" else WEIGHTS_ENV
        kind = "is a directory" if location.path.is_dir() else "does not exist"
        message = (
            f"UniverSeg weights file {location.path} ({setting}) {kind}; give the "
            f"path of {FILE_NAME}"
        )
        raise SPEError(message)
    return location.path


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 digest of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_status(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What :func:`weights_info` reports, as a JSON-serialisable dict.

    Keys: ``found`` (bool), ``path``, ``source``, ``size_bytes``, ``sha256``
    (None when not found), ``argument``, ``environment`` (the values given
    those ways, or None), ``cache_file``, ``cache_file_exists``, ``file_name``,
    ``url`` and ``license``.
    """
    location = find_weights(path)
    found = location is not None and location.exists
    cache_file = cached_weights_path()
    return {
        "found": found,
        "path": str(location.path) if found else None,
        "source": location.source if found else None,
        "size_bytes": location.path.stat().st_size if found else None,
        "sha256": file_sha256(location.path) if found else None,
        "argument": None if path is None else str(path),
        "environment": os.environ.get(WEIGHTS_ENV) or None,
        "cache_file": str(cache_file),
        "cache_file_exists": cache_file.is_file(),
        "file_name": FILE_NAME,
        "url": RELEASE_URL,
        "license": LICENSE_NOTE,
    }


def weights_info(path: str | os.PathLike[str] | None = None) -> str:
    """A few lines for ``spe weights info``: where the weights are, how to give
    them, and their licence."""
    status = weights_status(path)
    location = find_weights(path)

    if location is None:
        headline = "UniverSeg weights: not found"
    elif not status["found"]:
        headline = (
            f"UniverSeg weights: not found at {location.path} ({location.describe()})"
        )
    else:
        headline = (
            f"UniverSeg weights: {location.path} ({location.describe()}), "
            f"{status['size_bytes']} bytes, sha256 {status['sha256']}"
        )

    def state(value: str | None, absent: str) -> str:
        if value is None:
            return absent
        return (
            value if Path(value).expanduser().is_file() else f"{value} (no such file)"
        )

    cache_state = "present" if status["cache_file_exists"] else "absent"
    lines = [
        headline,
        "Looked up in this order:",
        f"  1. {WEIGHTS_FLAG} PATH (weights=PATH in Python): "
        + state(status["argument"], "not given"),
        f"  2. environment variable {WEIGHTS_ENV}: "
        + state(status["environment"], "not set"),
        f"  3. cache file {status['cache_file']}: {cache_state} "
        f"(`{DOWNLOAD_COMMAND}` puts it there; {CACHE_DIR_ENV} moves the cache)",
        f"Official file: {RELEASE_URL}",
        f"Licence: {LICENSE_NOTE}.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Downloading


class DownloadedWeights(NamedTuple):
    """A finished download: the file, its size in bytes and its SHA-256 (hex)."""

    path: Path
    size_bytes: int
    sha256: str


def download_weights(
    url: str = RELEASE_URL,
    destination: str | os.PathLike[str] | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: bool = True,
) -> DownloadedWeights:
    """Download the weights to ``destination``, atomically.

    The file is streamed into a temporary file next to the destination,
    checked to be UniverSeg v1 weights, then renamed over the destination, so
    an interrupted or failed download never leaves a partial file behind.

    Args:
        url: where to download from (http or https).
        destination: the file to write, or a directory to put
            :data:`FILE_NAME` in; default the cache file
            (:func:`cached_weights_path`). An existing file is replaced.
        timeout_s: seconds to wait for the connection and for each block of
            data before giving up.
        progress: show a progress bar on stderr.

    Raises:
        SPEError: the network is unreachable, the server answers with an
            error, the transfer stops early, the file is not UniverSeg v1
            weights, or the destination cannot be written.
    """
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise SPEError(f"cannot download from {url!r}; give an http or https URL")
    target = Path(destination).expanduser() if destination else cached_weights_path()
    if target.is_dir():
        target = target / FILE_NAME
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, partial_name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".part"
        )
    except OSError as error:
        raise SPEError(f"cannot write to {target.parent}: {error}") from error
    partial = Path(partial_name)

    try:
        with os.fdopen(descriptor, "wb") as handle:
            size_bytes, sha256 = _stream(
                url, handle, timeout_s=timeout_s, progress=progress
            )
        _check_downloaded(partial, url)

        # mkstemp makes the file private; weights are no secret.
        partial.chmod(0o644)
        partial.replace(target)
    except BaseException:
        # Whatever went wrong (including Ctrl-C), leave no half file behind.
        partial.unlink(missing_ok=True)
        raise

    logger.info(
        "downloaded %s (%d bytes, sha256 %s) to %s", url, size_bytes, sha256, target
    )
    return DownloadedWeights(path=target, size_bytes=size_bytes, sha256=sha256)


def _stream(
    url: str, handle: Any, *, timeout_s: float, progress: bool
) -> tuple[int, str]:
    """Write the body at ``url`` to ``handle``; returns its size and SHA-256."""
    # A fresh opener reads the proxy settings of the environment as it is now.
    opener = urllib.request.build_opener()
    digest = hashlib.sha256()
    size_bytes = 0
    expected: int | None = None
    try:
        with opener.open(url, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with tqdm(
                total=expected,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=FILE_NAME,
                file=sys.stderr,
                disable=not progress,
                leave=False,
            ) as bar:
                for block in iter(lambda: response.read(_CHUNK_BYTES), b""):
                    _write(handle, block)
                    digest.update(block)
                    size_bytes += len(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as error:
        message = (
            f"downloading {url} failed: HTTP {error.code} {error.reason}; check the "
            f"URL, or download {FILE_NAME} by hand and pass {WEIGHTS_FLAG} PATH"
        )
        raise SPEError(message) from error
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        raise SPEError(_network_failure(url, error, size_bytes, expected)) from error

    if expected is not None and size_bytes != expected:
        message = (
            f"the download from {url} stopped after {size_bytes} of {expected} "
            f"bytes; run it again"
        )
        raise SPEError(message)
    return size_bytes, digest.hexdigest()


def _write(handle: Any, block: bytes) -> None:
    """Append ``block`` to the open file ``handle``; a full disk is a user error."""
    try:
        handle.write(block)
    except OSError as error:
        raise SPEError(f"cannot write {handle.name}: {error}") from error


def _network_failure(
    url: str, error: BaseException, size_bytes: int, expected: int | None
) -> str:
    """The one-line message for a download that failed on the way."""
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, TimeoutError):
        reason = "timed out"
    if isinstance(error, http.client.IncompleteRead) or size_bytes:
        of = f" of {expected}" if expected is not None else ""
        return (
            f"the download from {url} stopped after {size_bytes}{of} bytes "
            f"({reason}); run it again"
        )
    return (
        f"could not reach {url} ({reason}); check the network connection, or "
        f"download {FILE_NAME} on another machine and pass {WEIGHTS_FLAG} PATH"
    )


def _check_downloaded(path: Path, url: str) -> None:
    """Raise SPEError unless the downloaded file holds UniverSeg v1 weights."""
    # Imported here: the network module imports this one.
    from spe.segmenters.universeg import state_dict_shapes

    load_state_dict(path, state_dict_shapes(), source=f"the file downloaded from {url}")


# ---------------------------------------------------------------------------
# Loading


def load_state_dict(
    path: str | os.PathLike[str],
    expected_shapes: Mapping[str, tuple[int, ...]],
    *,
    source: str | None = None,
) -> dict[str, torch.Tensor]:
    """Load a state dict and check its names and shapes.

    Loading uses ``weights_only=True``: the file is never allowed to run code.

    Args:
        path: a PyTorch file holding a state dict (a mapping name -> tensor).
        expected_shapes: the name and shape of every tensor the model needs.
        source: how error messages name the file; default its path.

    Raises:
        SPEError: the file cannot be read, is not a state dict, or has missing,
            unexpected or wrongly shaped tensors (the message names them).
    """
    path = Path(path)
    subject = source or str(path)
    expected = f"expected the official {FILE_NAME}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise SPEError(f"weights file {subject} does not exist") from error
    except Exception as error:
        # torch.load raises many types (unpickling, zip, runtime) for a bad
        # file, and their text can be long or advise unsafe loading: give the
        # type only.
        logger.debug("torch.load(%s) failed: %s", path, error)
        message = (
            f"{subject} is not a PyTorch weights file ({type(error).__name__}); "
            f"{expected}"
        )
        raise SPEError(message) from error

    if not isinstance(state, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        message = (
            f"{subject} holds a {type(state).__name__}, not a state dict of "
            f"tensors; {expected}"
        )
        raise SPEError(message)

    problems = _state_dict_problems(state, expected_shapes)
    if problems:
        more = f" and {len(problems) - 3} more differences" if len(problems) > 3 else ""
        message = (
            f"{subject} does not hold UniverSeg v1 weights: "
            f"{', '.join(problems[:3])}{more}; {expected}"
        )
        raise SPEError(message)
    return dict(state)


def _state_dict_problems(
    state: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """Each difference between a state dict and the expected names and shapes."""
    problems = [f"missing key {name}" for name in expected_shapes if name not in state]
    problems += [
        f"unexpected key {name}" for name in state if name not in expected_shapes
    ]
    for name, shape in expected_shapes.items():
        if name in state and tuple(state[name].shape) != tuple(shape):
            problems.append(
                f"{name} has shape {tuple(state[name].shape)} but UniverSeg expects "
                f"{tuple(shape)}"
            )
    return problems
