"""An output directory written safely: one writer at a time, files published by rename, resumable.

Every file is written beside its final name (`.NAME.partial`) and renamed when complete. A run's
manifest is written last, so a directory without it is never taken as finished. A journal
(`.ailora-progress.json`) records finished pieces and the settings that made them; `--resume` reuses
them only when the settings match.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError

#: the shape of the manifests this version writes (`manifests.upgrade` brings an older one to it)
MANIFEST_SCHEMA = 2

LOCK_NAME = ".ailora.lock"
JOURNAL_NAME = ".ailora-progress.json"


class OutputDir:
    """Context manager owning an output directory for one run.

    Args:
        path: the directory (created if missing).
        inputs: directories read by the run; the output may not lie inside one of them.
        overwrite: empty an existing non-empty directory first.
        resume: keep finished pieces from an earlier run with the same `settings`.
        settings: what must match for pieces to be reused.

    Raises:
        OutputError: not empty (without overwrite/resume), inside an input, or locked by another run.
    """

    #: scratch files a run keeps for --resume (removed with the journal once the manifest is written)
    WORK = ".work"

    def __init__(
        self,
        path: Path | str,
        *,
        inputs: list[Path] = (),
        overwrite: bool = False,
        resume: bool = False,
        settings: dict | None = None,
    ):
        self.path = Path(path).expanduser().absolute()
        self.settings = json.loads(json.dumps(settings or {}, sort_keys=True, default=str))
        self.overwrite, self.resume = overwrite, resume
        self.done: dict[str, dict] = {}
        for src in inputs:
            src = Path(src).resolve()
            if self.path.resolve() == src or src in self.path.resolve().parents:
                raise OutputError(f"-o {self.path}: lies inside the input {src}; choose a directory outside it")
        self._lock_fd: int | None = None

    def __enter__(self) -> OutputDir:
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"-o {self.path}: is a file, but the output is a directory; choose a directory path")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise OutputError(
                f"-o {self.path}: another ailora-tools run is writing there (locked); wait for it "
                "or choose another directory"
            ) from e
        try:
            self._prepare()
        except BaseException:
            self._unlock()
            raise
        return self

    def _prepare(self) -> None:
        existing = [p for p in self.path.iterdir() if p.name != LOCK_NAME]
        journal = self._read_journal()
        if self.resume and journal:
            _same_settings(self.path, journal.get("settings", {}), self.settings)
            self.done = journal.get("done", {})
            return
        if self.resume and not journal and existing and not self.overwrite:
            raise OutputError(
                f"--resume: {self.path} holds no interrupted run (no {JOURNAL_NAME}): its run is "
                "complete, or it is not an ailora-tools output; there is nothing to resume: use it as "
                "it is, or pass --overwrite to run it again"
            )
        if existing and not self.overwrite:
            hint = "--resume to finish the interrupted run there, " if journal else ""
            raise OutputError(
                f"-o {self.path}: exists and is not empty; pass {hint}--overwrite to replace it, "
                "or choose another directory"
            )
        for p in existing:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        self._write_journal()

    def __exit__(self, *exc) -> None:
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _read_journal(self) -> dict:
        try:
            return json.loads((self.path / JOURNAL_NAME).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _write_journal(self) -> None:
        with self.open_atomic(JOURNAL_NAME, "w") as f:
            json.dump({"settings": self.settings, "done": self.done}, f, sort_keys=True)

    def finished(self, piece: str) -> dict | None:
        """What an earlier run recorded for `piece`, if it finished it with the same settings."""
        return self.done.get(piece)

    def mark_done(self, piece: str, record: dict) -> None:
        """Record `piece` as finished (journal rewritten atomically)."""
        self.done[piece] = record
        self._write_journal()

    def partial(self, rel: str) -> Path:
        """The temporary path beside `rel`'s final name."""
        final = self.path / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        return final.with_name(f".{final.name}.partial")

    def publish(self, rel: str) -> Path:
        """Rename `rel`'s partial file to its final name."""
        final = self.path / rel
        os.replace(self.partial(rel), final)
        return final

    @contextmanager
    def open_atomic(self, rel: str, mode: str = "wb") -> Iterator:
        """Open `rel` for writing; it appears under its final name only if the block completes."""
        tmp = self.partial(rel)
        try:
            with open(tmp, mode) as f:
                yield f
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.publish(rel)

    def write_manifest(self, rel: str, manifest: dict) -> None:
        """Write the run's manifest last (stamped with `MANIFEST_SCHEMA`) and drop the journal: from here on the
        directory is complete."""
        with self.open_atomic(rel, "w") as f:
            json.dump({**manifest, "schema": MANIFEST_SCHEMA}, f, indent=2, sort_keys=True, default=str)
        (self.path / JOURNAL_NAME).unlink(missing_ok=True)
        shutil.rmtree(self.path / self.WORK, ignore_errors=True)


def finished_run(path: Path | str, manifest: str, settings: dict) -> dict | None:
    """The manifest of a run that finished in `path` with these `settings`, or None when none did (no manifest, or
    an interrupted run's journal is there): what `--resume` then leaves as it is. Reads only; writes nothing.

    Raises:
        OutputError: the finished run used other settings (or read files whose content has changed since).
    """
    path = Path(path).expanduser().absolute()
    if (path / JOURNAL_NAME).is_file():
        return None
    try:
        record = json.loads((path / manifest).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    now = json.loads(json.dumps(settings, sort_keys=True, default=str))
    _same_settings(path, {k: record.get(k) for k in now}, now, complete=manifest)
    return record


def _same_settings(path: Path, before: dict, now: dict, complete: str | None = None) -> None:
    """Refuse to resume a run made with other settings; `complete`: the manifest of a run that finished."""
    if before == now:
        return
    changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    files = now.get("inputs") or {}
    moved = sorted(f for f in files if (before.get("inputs") or {}).get(f) != files[f])
    run = f"the run in {path}" + (f" (complete: {complete} is written)" if complete else "")
    if moved:  # "inputs": flag -> digest of a file the run reads (train's data)
        raise OutputError(
            f"--resume: {', '.join(moved)} changed since {run} began (its content differs from the "
            "one recorded): restore the file, or start again with --overwrite"
        )
    raise OutputError(
        f"--resume: {run} used other settings ({', '.join(changed)}); rerun with the same ones, or "
        "use --overwrite to start again"
    )
