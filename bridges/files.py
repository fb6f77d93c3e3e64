"""Files that must never be seen half-written: one atomic write for all of them (checkpoints,
episodes, datasets' metadata, reports, logs), the clean-up of what a killed writer left behind,
and the content hash of a file."""
import hashlib
import json
import os
import re


def _temp_path(path, pid):
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{pid}")


def atomic_write(path, write, mode="wb"):
    """Write a file all at once or not at all: write(f) fills a temporary file opened with `mode`
    in path's folder, `.NAME.tmpPID` (named with this process's id, so concurrent writers do not
    collide), which then replaces path with os.replace. On any error the temporary file is
    removed and a previous file at path is left intact; one left by a killed process is removed
    by remove_stale_temp_files."""
    path = os.fspath(path)
    tmp = _temp_path(path, os.getpid())
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_temp_files(folder):
    """Remove atomic_write's temporary files in `folder` whose process is gone (a `kill -9`
    during a write leaves one behind). Returns the paths removed."""
    removed = []
    for name in os.listdir(folder):
        match = re.fullmatch(r"\..+\.tmp(\d+)", name)
        if match and not _process_alive(int(match.group(1))):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
            except FileNotFoundError:  # another process cleaned it first
                pass
    return removed


def file_sha256(path):
    """sha256 hex digest of the bytes of the file at `path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_jsonl(path):
    """The rows of a JSON-lines file (blank lines skipped): FileNotFoundError when it is missing,
    ValueError naming the file and the line that is not JSON."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {n}: not valid JSON ({err})") from None
    return rows
