"""Files the library builds once and keeps (converted weights, the pattern model): written atomically,
checked when read, rebuilt when bad."""
from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

__all__ = ["cache_dir", "cached_file"]


def cache_dir() -> Path:
    "Where built files live: `$FASTAI_FREEZE_CACHE`, else `~/.cache/fastai_freeze`."
    return Path(os.environ.get("FASTAI_FREEZE_CACHE", Path.home() / ".cache" / "fastai_freeze"))


def cached_file(path: Path, build: Callable[[Path], None], check: Callable[[Path], None]) -> Path:
    """`path`, built by `build(tmp)` if it is missing or if `check(path)` raises.

    `build` writes a temporary file with a unique name in the same folder, which then replaces
    `path` in one step (`os.replace`): a reader never sees a half-written file, and two processes
    building at once each write their own temporary file (the last one to finish wins; both are
    complete). A file that fails `check` (truncated, empty, garbage) is reported with its name and
    rebuilt. If building or checking the new file fails, the temporary file is removed and the
    error propagates.
    """
    path = Path(path)
    if path.exists():
        try:
            check(path)
            return path
        except Exception as e:  # noqa: BLE001 - any failure to read the file means: rebuild it
            warnings.warn(f"the cached file {path} is unreadable or wrong ({type(e).__name__}: {e}); "
                          "rebuilding it", stacklevel=3)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a folder should be, no permission
        raise OSError(f"the cache folder {path.parent} cannot be created ({type(e).__name__}: {e.strerror or e}); "
                      "set FASTAI_FREEZE_CACHE to a folder you can write to") from None
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        build(Path(tmp))
        check(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
