"""The outbox: finished results kept on disk until their server has answered for them.

    <outbox>/<job>-<registration>/
        manifest.json               who gets the result and how: instance URL, runner name, a hash of the
                                    runner token, job uuid, type, token and payload (custom upload targets),
                                    the result's text fields and files (name, size)
        files/<field>/<file name>   the result files, moved here from the job's folder

A result enters the outbox before `success` is first tried, so neither an outage nor a restart loses it:
its files are moved (a rename: the outbox sits next to the job folders, on the same disk; a copy when it
cannot) and synced, then the manifest is written atomically and synced. The manifest is the commit: a folder
without one is a put that was interrupted, removed at the next start like anything it cannot read back
(damaged manifest, missing or truncated file). An entry is removed once its server has answered for it
(delivered, or the job is not ours any more) or its delivery was given up.

Every method does blocking file work: callers on the event loop run them in a thread.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tuberunner.protocol.jobs import JobType
from tuberunner.runner.config import InstanceConfig, atomic_write, fsync_dir
from tuberunner.runner.job import AcceptedJob, JobOutput

__all__ = [
    "MANIFEST",
    "Outbox",
    "OutboxEntry",
    "token_digest",
]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_VERSION = 1
_SAFE = re.compile(r"^[A-Za-z0-9-]{1,64}$")


def token_digest(runner_token: str) -> str:
    """What the manifest keeps of the runner token: enough to see a registration was replaced since."""
    return hashlib.sha256(runner_token.encode()).hexdigest()


@dataclass(frozen=True)
class OutboxEntry:
    folder: Path
    # (instance URL, runner name): the registration the result belongs to.
    instance_key: tuple[str, str]
    runner_token_sha256: str
    job: AcceptedJob
    output: JobOutput
    # Wall clock: when the result entered the outbox (the outage limit counts from here, across restarts).
    created_at: float
    # A `success` was started: it may have reached the server even if no answer came back.
    attempted: bool = False

    def belongs_to(self, instance: InstanceConfig) -> bool:
        return self.instance_key == instance.key and self.runner_token_sha256 == token_digest(
            instance.runner_token
        )


class Outbox:
    def __init__(self, root: Path) -> None:
        self.root = root

    def folder_for(self, job: AcceptedJob, instance: InstanceConfig) -> Path:
        """One folder per job and registration (two instances may hand out the same uuid)."""
        name = job.uuid if _SAFE.match(job.uuid) else hashlib.sha256(job.uuid.encode()).hexdigest()[:32]
        registration = hashlib.sha256(f"{instance.url}\n{instance.runner_name}".encode()).hexdigest()[:12]
        return self.root / f"{name}-{registration}"

    def put(
        self, job: AcceptedJob, instance: InstanceConfig, output: JobOutput, work_dir: Path
    ) -> OutboxEntry:
        """Move the result of `job` into a new entry, durably. Files under `work_dir` (the job's own folder)
        are moved; others (a file shared with other jobs) are copied."""
        folder = self.folder_for(job, instance)
        if folder.exists():  # a put interrupted before its manifest: nothing in it counts
            shutil.rmtree(folder)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            files_dir = folder / "files"
            files_dir.mkdir(parents=True, mode=0o700)
            files: dict[str, Path] = {}
            for field_name, source in output.files.items():
                field_dir = files_dir / field_name
                field_dir.mkdir(mode=0o700)
                target = field_dir / source.name
                _move_or_copy(source, target, owned=source.is_relative_to(work_dir))
                _fsync_file(target)
                fsync_dir(field_dir)
                files[field_name] = target
            fsync_dir(files_dir)
            entry = OutboxEntry(
                folder=folder,
                instance_key=instance.key,
                runner_token_sha256=token_digest(instance.runner_token),
                job=job,
                output=JobOutput(files=files, fields=dict(output.fields)),
                created_at=time.time(),
            )
            self._write(entry)
            fsync_dir(self.root)
        except BaseException:
            # Disk full, say: the job fails (and is reported); an entry half made must not stay.
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return entry

    def mark_attempted(self, entry: OutboxEntry) -> OutboxEntry:
        """Before the first `success`: from now on "not in processing state" may mean it got through,
        after a restart too."""
        if entry.attempted:
            return entry
        marked = replace(entry, attempted=True)
        self._write(marked)
        return marked

    def remove(self, entry: OutboxEntry) -> None:
        # The manifest first: a removal cut short leaves an incomplete entry, never a resumable one.
        (entry.folder / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(entry.folder, ignore_errors=True)

    def load(self) -> list[OutboxEntry]:
        """Every complete entry, oldest first; anything else in the outbox is removed with a log line."""
        if not self.root.is_dir():
            return []
        entries = []
        for folder in sorted(self.root.iterdir()):
            try:
                entries.append(self._read(folder))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("outbox: removing %s, which cannot be delivered: %s", folder, exc)
                if folder.is_dir() and not folder.is_symlink():
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    folder.unlink(missing_ok=True)
        return sorted(entries, key=lambda e: e.created_at)

    # -------------------------------------------------------------------- manifest

    def _write(self, entry: OutboxEntry) -> None:
        job = entry.job
        manifest = {
            "version": _VERSION,
            "instance": {
                "url": entry.instance_key[0],
                "runnerName": entry.instance_key[1],
                "runnerTokenSha256": entry.runner_token_sha256,
            },
            "job": {
                "uuid": job.uuid,
                "type": str(job.type),
                "jobToken": job.job_token,
                "payload": job.payload,
            },
            "result": {
                "files": {
                    name: {"path": str(path.relative_to(entry.folder)), "size": path.stat().st_size}
                    for name, path in entry.output.files.items()
                },
                "fields": entry.output.fields,
            },
            "createdAt": entry.created_at,
            "attempted": entry.attempted,
        }
        # The job token is a secret: like the config file, readable by this user only.
        atomic_write(entry.folder / MANIFEST, json.dumps(manifest, indent=1), mode=0o600)

    @staticmethod
    def _read(folder: Path) -> OutboxEntry:
        if not folder.is_dir() or folder.is_symlink():
            raise ValueError("not an outbox entry")
        path = folder / MANIFEST
        if not path.exists():
            raise ValueError("no manifest: its result was being stored when the runner stopped")
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != _VERSION:
            raise ValueError(f"manifest version {data.get('version')!r} is not {_VERSION}")
        instance, job, result = data["instance"], data["job"], data["result"]
        files: dict[str, Path] = {}
        for name, described in result["files"].items():
            file = (folder / described["path"]).resolve()
            if not file.is_relative_to(folder.resolve()):
                raise ValueError(f"result file {described['path']!r} is outside the entry")
            size = file.stat().st_size
            if size != described["size"]:
                raise ValueError(f"result file {file.name} has {size} bytes, not {described['size']}")
            files[str(name)] = file
        fields = {str(k): str(v) for k, v in result["fields"].items()}
        if not isinstance(job["payload"], dict):
            raise ValueError("the job payload is not an object")
        accepted = AcceptedJob(
            uuid=str(job["uuid"]),
            type=JobType(job["type"]),
            payload=job["payload"],
            job_token=str(job["jobToken"]),
            instance_url=str(instance["url"]),
        )
        return OutboxEntry(
            folder=folder,
            instance_key=(str(instance["url"]), str(instance["runnerName"])),
            runner_token_sha256=str(instance["runnerTokenSha256"]),
            job=accepted,
            output=JobOutput(files=files, fields=fields),
            created_at=float(data["createdAt"]),
            attempted=bool(data["attempted"]),
        )


def _move_or_copy(source: Path, target: Path, *, owned: bool) -> None:
    if owned:
        try:
            os.replace(source, target)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:  # the outbox is on another disk than the job folders
                raise
    shutil.copyfile(source, target)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
