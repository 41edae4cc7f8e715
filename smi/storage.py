"""Where the service's bytes live, and the one layout every part uses: the activities write
there, the API serves from it, retention and erasure delete from it.

    uploads/<upload_id>                     a storefront's upload (<upload_id>.part while it arrives)
    jobs/<job_id>/original.<ext>            the image as fetched
    jobs/<job_id>/compressed_q<N>.jpg       copies for Upsampler's input limit
    jobs/<job_id>/tmp/result-<attempt>      downloads in progress (.part) and done, before validation
    jobs/<job_id>/upscaled_<W>x<H>.<ext>    the result the customer downloads

Today a folder on a POSIX file system (SMI_STORAGE_DIR). Every deletion is of what is there:
running one again deletes nothing more.
"""

from __future__ import annotations

import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

from smi.vocabulary import InventoryRequest, RetentionDeleted, RetentionPlan, StoredNames

STORED_ID = re.compile(r"^[0-9a-f]{32}$")  # job ids and upload ids: nothing else under jobs/ and uploads/ is touched


def compressed_name(quality: int) -> str:
    return f"compressed_q{quality}.jpg"


class LocalStorage:
    def __init__(self, root: Path):
        self.root = root

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def tmp_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "tmp"

    def uploads_dir(self) -> Path:
        return self.root / "uploads"

    def original(self, job_id: str) -> Path | None:
        """The job's stored original, once it is whole (whatever its extension)."""
        return next(iter(sorted(self.job_dir(job_id).glob("original.*"))), None)

    def inventory(self, request: InventoryRequest) -> StoredNames:
        """A page (by name, after `request.after`) of the job folders holding files, or of the uploads."""
        folder = self.root / request.kind
        found: dict[str, datetime] = {}
        if folder.is_dir():
            for entry in folder.iterdir():
                name = entry.name.removesuffix(".part") if request.kind == "uploads" else entry.name
                if not STORED_ID.match(name) or name <= request.after:
                    continue
                times = [_mtime(p) for p in ([entry] if entry.is_file() else entry.rglob("*")) if p.is_file()]
                if times:  # an empty folder holds nothing to delete
                    found[name] = max(times + [found.get(name, times[0])])
        names = sorted(found)
        page = names[: request.limit]
        return StoredNames(
            request.kind, page, [found[name] for name in page], page[-1] if len(names) > request.limit else None
        )

    def delete_retained(self, plan: RetentionPlan) -> RetentionDeleted:
        """Delete what the plan makes due; returns how many files of each kind were there."""
        deleted = RetentionDeleted()
        for job_id in filter(STORED_ID.match, plan.inputs):
            job_dir = self.job_dir(job_id)
            for path in sorted(job_dir.iterdir()) if job_dir.is_dir() else []:
                if path.name == "tmp" or path.name.endswith(".part"):
                    deleted.temporary += _remove(path)
                elif path.name.startswith("original."):
                    deleted.originals += _remove(path)
                elif path.name.startswith("compressed_q"):
                    deleted.compressed += _remove(path)
        for job_id in filter(STORED_ID.match, plan.results):
            for path in sorted(self.job_dir(job_id).glob("upscaled_*")):
                deleted.results += _remove(path)
        for job_id in filter(STORED_ID.match, set(plan.inputs) | set(plan.results)):
            _remove_if_empty(self.job_dir(job_id))
        for upload_id in plan.uploads:
            deleted.uploads += self.erase_upload(upload_id)
        return deleted

    def erase_job_files(self, job_id: str) -> int:
        """Every file of the job (original, copies, result, leftovers) and its folder; returns how many files."""
        if not STORED_ID.match(job_id):
            return 0
        return _remove(self.job_dir(job_id))

    def erase_upload(self, upload_id: str) -> int:
        """The upload (and a partial one); returns how many files there were."""
        if not STORED_ID.match(upload_id):
            return 0
        folder = self.uploads_dir()
        return _remove(folder / upload_id) + _remove(folder / f"{upload_id}.part")


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)


def _remove(path: Path) -> int:
    """Delete a file or a folder tree; returns how many files were deleted (0 when already gone)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return 1
    if not path.is_dir():
        return 0
    count = sum(1 for p in path.rglob("*") if p.is_file() or p.is_symlink())
    shutil.rmtree(path, ignore_errors=True)
    return count


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (a result kept), or already gone
        pass
