"""Writing result files atomically, so a crash never leaves half a file.

Every file is written to a temporary name in the same folder and renamed into
place; a reader sees either the old file, or none, or the complete new one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from spe.errors import SPEError


def ensure_folder(folder: Path | str) -> Path:
    """Create ``folder`` (and parents) if needed; an error if a file is there."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SPEError(f"{folder}: exists and is not a folder; choose another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SPEError(f"{folder}: cannot create the folder ({error})") from error
    return folder


def check_writable(folder: Path | str, names: Sequence[str] = ()) -> Path:
    """Make sure results can be written to ``folder`` before any work starts.

    Creates the folder, writes and removes a probe file, and checks that none
    of ``names`` (the files to be written) is taken by a folder.

    Raises:
        SPEError: naming the folder or file and what to do.
    """
    folder = ensure_folder(folder)
    for name in names:
        if (folder / name).is_dir():
            message = f"{folder / name}: is a folder, where a result file goes; move it"
            raise SPEError(message)
    try:
        descriptor, probe = tempfile.mkstemp(dir=folder, prefix=".spe-probe-")
        os.close(descriptor)
        Path(probe).unlink()
    except OSError as error:
        message = (
            f"{folder}: cannot write here ({error.strerror}); choose another --out"
        )
        raise SPEError(message) from error
    return folder


def check_output_file(path: Path | str) -> Path:
    """Like :func:`check_writable` for a single output file."""
    path = Path(path)
    if path.is_dir():
        raise SPEError(
            f"{path}: is a folder; give a file name such as calibration.json"
        )
    check_writable(path.parent, [path.name])
    return path


def _file_mode() -> int:
    """Permissions of a new file under the process umask (usually 0644)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_bytes_atomic(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    Raises:
        SPEError: the file cannot be written (naming it and the reason).
    """
    path = Path(path)
    ensure_folder(path.parent)
    try:
        descriptor, name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
    except OSError as error:
        message = f"{path}: cannot write ({error.strerror}); choose another --out"
        raise SPEError(message) from error
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes private files; results are as readable as any other.
        temporary.chmod(_file_mode())
        temporary.replace(path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        message = f"{path}: cannot write ({error.strerror}); choose another --out"
        raise SPEError(message) from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path | str, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def to_json_safe(value: Any) -> Any:
    """Replace non-finite floats by strings ("inf", "-inf", "nan") recursively.

    Strict JSON has no infinity; a per-case distance can be infinite by
    convention, and readers should see that, not a crash or a null.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(key): to_json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_safe(item) for item in value]
    if hasattr(value, "item") and callable(value.item):
        return to_json_safe(value.item())
    return value


def dumps_json(value: Any) -> str:
    """Indented strict JSON text of ``value`` (see :func:`to_json_safe`)."""
    return json.dumps(to_json_safe(value), indent=2, allow_nan=False) + "\n"


def write_json_atomic(path: Path | str, value: Any) -> Path:
    """Write ``value`` as indented strict JSON, atomically."""
    return write_text_atomic(path, dumps_json(value))


def format_csv_value(value: Any) -> str:
    """Floats with 6 significant digits; inf stays 'inf'; bools as 0/1."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.6g}"
    return str(value)


def write_csv_atomic(
    path: Path | str, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]
) -> Path:
    """Write rows (maps from column name to value) as CSV, atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([format_csv_value(row.get(name, "")) for name in columns])
    return write_text_atomic(path, buffer.getvalue())
