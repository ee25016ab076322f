"""The files of one storage node: what the core's storage effects do on a real disk.

    STATE/node.json                    management information (replaced atomically)
    STATE/volumes/NAME.img             a volume (sparse file)
    STATE/volumes/NAME.KIND.bitmap     diff / migrated / activity bitmap: 32-byte header, then bits
                                       (the header names the bytes per bit: a region, or the diff block)
    STATE/journals/GROUP.journal|.meta a source group's journal (journal/FORMAT.md)
    STATE/journals/GROUP.applied       a secondary group's applied pointer: two checksummed slots
    STATE/boot_id, STATE/clean         the machine's boot id at start; present after a clean stop

No rule lives here: ``run(effect)`` does exactly what the effect says, and
``load()`` reads back what is on disk for the core's ``Boot``.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Any, Callable

from journal import Journal

from .core import effects as E
from .core.node import BootState, JournalState
from .errors import IntegrityError, RangeNotStored, RcopyError
from .files import atomic_write, fsync_dir
from .volume import VolumeStore

BITMAP_MAGIC = b"RCBM"
_BITMAP_HEADER = struct.Struct("<4sIQQQ")      # magic, version, nbits, bytes per bit, size_bytes
BITMAP_HEADER_BYTES = 32
_APPLIED = struct.Struct("<QQQI")              # record number, applied, applying, crc32 of the rest
APPLIED_SLOT = 64
KINDS = ("diff", "migrated", "activity")


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class NodeStorage:
    """Carries out storage effects in one node's state directory."""

    def __init__(self, state_dir: Path, region_bytes: int) -> None:
        self.dir = Path(state_dir)
        self.region_bytes = region_bytes
        self.vdir = self.dir / "volumes"
        self.jdir = self.dir / "journals"
        self.vdir.mkdir(parents=True, exist_ok=True)
        self.jdir.mkdir(parents=True, exist_ok=True)
        self.mgmt_path = self.dir / "node.json"
        self._lock = threading.Lock()
        self.stores: dict[str, VolumeStore] = {}
        self.bitmaps: dict[tuple[str, str], int] = {}
        self.journals: dict[str, Journal] = {}
        self.applied: dict[str, tuple[int, int]] = {}   # fd, next record number
        self._sizes: dict[str, int] = {}

    # ------------------------------------------------------------------ start and stop
    def load(self, incarnation: str) -> BootState:
        mgmt = None
        if self.mgmt_path.exists():
            try:
                mgmt = json.loads(self.mgmt_path.read_text())
            except (OSError, ValueError) as exc:
                raise IntegrityError(f"management information {self.mgmt_path} is corrupt ({exc}); "
                                     f"restore it from a backup") from None
        st = BootState(mgmt=mgmt, incarnation=incarnation)
        for name, info in (mgmt or {}).get("volumes", {}).items():
            self._open_volume(name, int(info["size"]))
            for kind in KINDS:
                # a diff bitmap of another block size than the management information says is
                # not read as this one: it is damaged, and the core marks every block
                block = int(info.get("diff_block_bytes") or 0) if kind == "diff" else 0
                st.bitmaps[(name, kind)] = self._load_bitmap(name, kind, int(info["size"]), block)
        for name, info in (mgmt or {}).get("source_groups", {}).items():
            j = Journal(self.jdir, name, int(info["journal_bytes"]))
            self.journals[name] = j
            st.journals[name] = JournalState(**j.state())
        for name in (mgmt or {}).get("dest_groups", {}):
            st.applied[name] = self._load_applied(name)
        marker = self.dir / "clean"
        st.clean = marker.exists()
        old_boot = (self.dir / "boot_id").read_text().strip() if (self.dir / "boot_id").exists() else ""
        now_boot = boot_id()
        st.power_lost = bool(mgmt) and bool(old_boot) and old_boot != now_boot
        atomic_write(self.dir / "boot_id", (now_boot + "\n").encode())
        marker.unlink(missing_ok=True)
        fsync_dir(self.dir)
        return st

    def stop(self, clean: bool) -> None:
        """Flush and close everything; mark the stop clean (nothing was in flight)."""
        for store in self.stores.values():
            store.flush()
        for j in self.journals.values():
            j.close()
        for fd in self.bitmaps.values():
            os.fdatasync(fd)
            os.close(fd)
        for fd, _ in self.applied.values():
            os.close(fd)
        for store in self.stores.values():
            store.close()
        if clean:
            atomic_write(self.dir / "clean", b"clean\n")

    # ------------------------------------------------------------------ effects
    def run(self, eff: Any) -> Any:
        try:
            return self._run(eff)
        except RcopyError:
            raise
        except OSError as exc:
            raise IntegrityError(f"{type(eff).__name__} failed: {exc}") from None

    def write_volume(self, volume: str, offset: int, data: Any, keep_gil: bool = True) -> None:
        """``run(VolWrite(volume, offset, data))`` without the effect (a host write's own path)."""
        try:
            self.stores[volume].write(offset, data, keep_gil)
        except OSError as exc:
            raise IntegrityError(f"VolWrite failed: {exc}") from None

    def _run(self, eff: Any) -> Any:
        do = self._table.get(type(eff))
        if do is None:
            raise TypeError(f"not a storage effect: {eff!r}")
        return do(self, eff)

    def _vol_write(self, eff: E.VolWrite) -> None:
        self.stores[eff.volume].write(eff.offset, eff.data)

    def _vol_write_many(self, eff: E.VolWriteMany) -> None:
        stores = self.stores
        for volume, offset, data in eff.writes:
            if type(data) is E.Zeros:
                stores[volume].zero(offset, data.length)
            else:
                stores[volume].write(offset, data)

    def _vol_read(self, eff: E.VolRead) -> bytes | None:
        store = self.stores[eff.volume]
        if eff.sparse:
            return store.read_sparse(eff.offset, eff.length)
        return store.read(eff.offset, eff.length)

    def _bitmap_create(self, eff: E.BitmapCreate) -> None:
        with self._lock:
            os.close(self.bitmaps.pop((eff.volume, eff.kind)))
            self._new_bitmap(eff.volume, eff.kind, eff.size, eff.block_bytes)

    def _journal_read(self, eff: E.JournalRead) -> list[E.JEntry]:
        j = self.journals[eff.group]
        out = j.read(eff.first, max_bytes=1 << 62, max_entries=eff.last - eff.first + 1)
        if not out or out[-1].seq != eff.last:
            raise RangeNotStored(f"journal {eff.group}: {eff.first}..{eff.last} not all stored")
        return [E.JEntry(x.seq, x.volume, x.offset, x.data) for x in out]

    def _journal_delete(self, eff: E.JournalDelete) -> None:
        j = self.journals.pop(eff.group, None)
        if j is not None:
            j.close()
        for suffix in (".journal", ".meta"):
            (self.jdir / f"{eff.group}{suffix}").unlink(missing_ok=True)

    _table: dict[type, Callable[["NodeStorage", Any], Any]] = {
        E.VolWrite: _vol_write,
        E.VolWriteMany: _vol_write_many,
        E.VolRead: _vol_read,
        E.VolHoleRun: lambda self, eff: self.stores[eff.volume].hole_run(eff.offset, eff.length),
        E.VolExtents: lambda self, eff: self.stores[eff.volume].extents(eff.offset, eff.length, eff.limit),
        E.VolSync: lambda self, eff: self.stores[eff.volume].flush(),
        E.VolZero: lambda self, eff: self.stores[eff.volume].zero(eff.offset, eff.length),
        E.BitmapPut: lambda self, eff: os.pwrite(self.bitmaps[(eff.volume, eff.kind)], eff.data,
                                                 BITMAP_HEADER_BYTES + eff.first) and None,
        E.BitmapSync: lambda self, eff: os.fdatasync(self.bitmaps[(eff.volume, eff.kind)]),
        E.BitmapCreate: _bitmap_create,
        E.JournalAppend: lambda self, eff: self.journals[eff.group].append_numbered(eff.entries),
        E.JournalSync: lambda self, eff: self.journals[eff.group].sync(),
        E.JournalRead: _journal_read,
        E.JournalDiscard: lambda self, eff: self.journals[eff.group].discard(eff.through),
        E.JournalCreate: lambda self, eff: self._create_journal(eff),
        E.JournalDelete: _journal_delete,
        E.SaveMgmt: lambda self, eff: atomic_write(self.mgmt_path,
                                                   json.dumps(eff.record, indent=1, sort_keys=True).encode()),
        E.SaveApplied: lambda self, eff: self._save_applied(eff.group, eff.applied, eff.applying),
        E.VolHash: lambda self, eff: self._hash(eff.volume, eff.chunk, eff.offset, eff.length),
        E.VolCreate: lambda self, eff: self._create_volume(eff.volume, eff.size, eff.diff_block_bytes),
        E.VolDelete: lambda self, eff: self._delete_volume(eff.volume),
    }

    # ------------------------------------------------------------------ volumes and bitmaps
    def _open_volume(self, name: str, size: int, create: bool = False) -> None:
        self.stores[name] = VolumeStore(self.vdir / f"{name}.img", size, create=create)
        self._sizes[name] = size

    def _bitmap_path(self, name: str, kind: str) -> Path:
        return self.vdir / f"{name}.{kind}.bitmap"

    def _geometry(self, size: int, block_bytes: int) -> tuple[int, bytes]:
        """(bytes of bits, header) of a bitmap with one bit per ``block_bytes`` (0: per region)."""
        block_bytes = block_bytes or self.region_bytes
        nbits = max(1, -(-size // block_bytes))
        header = _BITMAP_HEADER.pack(BITMAP_MAGIC, 1, nbits, block_bytes, size).ljust(BITMAP_HEADER_BYTES, b"\0")
        return (nbits + 7) // 8, header

    def _load_bitmap(self, name: str, kind: str, size: int, block_bytes: int = 0) -> bytes | None:
        """The bits, or None if the file is missing or damaged (the core then decides)."""
        path = self._bitmap_path(name, kind)
        nbytes, header = self._geometry(size, block_bytes)
        raw = path.read_bytes() if path.exists() else b""
        ok = len(raw) >= BITMAP_HEADER_BYTES + nbytes and raw[:BITMAP_HEADER_BYTES] == header
        if not ok:
            path.unlink(missing_ok=True)
            self._new_bitmap(name, kind, size, block_bytes)
            return None
        self.bitmaps[(name, kind)] = os.open(path, os.O_RDWR)
        return raw[BITMAP_HEADER_BYTES:BITMAP_HEADER_BYTES + nbytes]

    def _new_bitmap(self, name: str, kind: str, size: int, block_bytes: int = 0) -> None:
        """A clear bitmap, durably, in place of any old one (written aside, then renamed)."""
        nbytes, header = self._geometry(size, block_bytes)
        path = self._bitmap_path(name, kind)
        atomic_write(path, header, BITMAP_HEADER_BYTES + nbytes)      # 32 MiB of zeros for 1 TiB: sparse
        self.bitmaps[(name, kind)] = os.open(path, os.O_RDWR)

    def _create_volume(self, name: str, size: int, diff_block_bytes: int) -> None:
        with self._lock:
            self._open_volume(name, size, create=True)
            for kind in KINDS:
                self._new_bitmap(name, kind, size, diff_block_bytes if kind == "diff" else 0)
            self.stores[name].flush()
            fsync_dir(self.vdir)

    def _delete_volume(self, name: str) -> None:
        with self._lock:
            store = self.stores.pop(name, None)
            if store is not None:
                store.close()
            for kind in KINDS:
                fd = self.bitmaps.pop((name, kind), None)
                if fd is not None:
                    os.close(fd)
                self._bitmap_path(name, kind).unlink(missing_ok=True)
            (self.vdir / f"{name}.img").unlink(missing_ok=True)

    def _hash(self, name: str, chunk: int, offset: int = 0, length: int = -1) -> list[str]:
        store, size = self.stores[name], self._sizes[name]
        end = size if length < 0 else min(size, offset + length)
        if store.is_hole(offset, end - offset):        # a sparse range: one SEEK_DATA
            return ["0"] * -(-(end - offset) // chunk)
        out = []
        for off in range(offset, end, chunk):
            n = min(chunk, end - off)
            if store.is_hole(off, n):
                out.append("0")
                continue
            data = store.read(off, n)
            out.append("0" if not any(data) else hashlib.blake2b(data, digest_size=16).hexdigest())
        return out

    # ------------------------------------------------------------------ journals and applied pointers
    def _create_journal(self, eff: Any) -> None:
        with self._lock:
            old = self.journals.pop(eff.group, None)
            if old is not None:
                old.close()
            for suffix in (".journal", ".meta"):
                (self.jdir / f"{eff.group}{suffix}").unlink(missing_ok=True)
            j = Journal(self.jdir, eff.group, eff.capacity_bytes)
            if eff.counter > 1 or eff.head is not None:
                j.continue_from(eff.counter, eff.head)
            self.journals[eff.group] = j

    def _applied_fd(self, group: str) -> tuple[int, int]:
        entry = self.applied.get(group)
        if entry is None:
            path = self.jdir / f"{group}.applied"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            entry = (fd, 1)
            self.applied[group] = entry
        return entry

    def _save_applied(self, group: str, applied: int, applying: int) -> None:
        with self._lock:
            fd, record = self._applied_fd(group)
            body = struct.pack("<QQQ", record, applied, applying)
            os.pwrite(fd, _APPLIED.pack(record, applied, applying, zlib.crc32(body)).ljust(APPLIED_SLOT, b"\0"),
                      (record % 2) * APPLIED_SLOT)
            os.fdatasync(fd)
            self.applied[group] = (fd, record + 1)

    def _load_applied(self, group: str) -> tuple[int, int]:
        """The newest intact slot: (applied, applying); (0, 0) if there is none."""
        fd, _ = self._applied_fd(group)
        raw = os.pread(fd, 2 * APPLIED_SLOT, 0)
        best = (0, 0, 0)
        for slot in (0, 1):
            chunk = raw[slot * APPLIED_SLOT: slot * APPLIED_SLOT + _APPLIED.size]
            if len(chunk) < _APPLIED.size:
                continue
            record, applied, applying, crc = _APPLIED.unpack(chunk)
            if crc == zlib.crc32(struct.pack("<QQQ", record, applied, applying)) and record > best[0]:
                best = (record, applied, applying)
        self.applied[group] = (fd, best[0] + 1)
        return best[1], best[2]
