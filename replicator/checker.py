"""Crash-consistency checker: is an image a write-order-consistent prefix of the history?

The test side of SPEC 7, invariant 12 (V3 always equals the primary after exactly
the writes numbered <= some K) and invariant 19 (in sync mode K covers every
acknowledged write). Pure logic: callers pass log bytes and block readers; the
I/O side (the writer, reading devices) is ``blockwriter.py``.

Block format (``BLOCK_BYTES`` = 4096, little-endian)::

    offset  size  field
    0       8     magic b"RCPYCHK\\0"
    8       2     format version (1)
    10      2     reserved (0)
    12      4     volume index
    16      8     run id (random u64 per writer run)
    24      8     seq: global write number, 1-based, increasing across the run's volumes
    32      8     block index within the volume
    40      4052  payload: SHAKE-128 of (run id, seq)
    4092    4     crc32 of bytes [0, 4092)

A block without the magic was never written by the checker (zeros, a file system,
another tool) and counts as initial content. A block with the magic whose crc (or
version) does not check out is *torn*: a write only partly reached the medium.

Log format, one ASCII line per event, appended by the writer::

    H {"format": 1, "run_id": R, "volumes": V, "blocks": N, "devices": [...]}
    I <seq> <volume> <block>        issued: logged before the block write starts
    A <seq> <volume> <block>        acked: logged after the block write returned
    E {"seq": S, "errno": E, "error": "..."}   the write failed; the writer stopped

A last line without its newline (the writer was killed mid-line) is dropped. A write
that was issued but never acked may or may not be in the image; either is fine as
long as the image is still a prefix.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import struct
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Union

from .errors import IntegrityError

BLOCK_BYTES = 4096
MAGIC = b"RCPYCHK\0"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sHHIQQQ")  # magic, version, reserved, volume, run_id, seq, block
_CRC = struct.Struct("<I")
CRC_OFFSET = BLOCK_BYTES - _CRC.size
PAYLOAD_BYTES = CRC_OFFSET - _HEADER.size
_SEED = struct.Struct("<QQ")
U64_MAX = (1 << 64) - 1

#: Limits on what a verdict lists (the counts are always complete).
PROBLEMS_LISTED_MAX = 20
TORN_LISTED_MAX = 100

#: A volume image: a function returning block ``i`` (4096 bytes; shorter means
#: past the end), or a bytes-like object holding the whole volume.
BlockReader = Callable[[int], bytes]
Image = Union[BlockReader, bytes, bytearray, memoryview]


# ------------------------------------------------------------------ blocks
@dataclass(frozen=True, slots=True)
class BlockInfo:
    """The header of a block written by the checker; fields of a torn block are untrusted."""

    run_id: int
    seq: int
    volume: int
    block: int
    torn: bool = False


def make_block(run_id: int, seq: int, volume: int, block: int) -> bytes:
    """The 4096 bytes write ``seq`` of run ``run_id`` puts at ``block`` of ``volume``."""
    assert 0 <= run_id <= U64_MAX and 1 <= seq <= U64_MAX, (run_id, seq)
    assert 0 <= volume < 1 << 32 and 0 <= block <= U64_MAX, (volume, block)
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, volume, run_id, seq, block)
    body = head + hashlib.shake_128(_SEED.pack(run_id, seq)).digest(PAYLOAD_BYTES)
    return body + _CRC.pack(zlib.crc32(body))


def parse_block(buf: bytes | bytearray | memoryview) -> BlockInfo | None:
    """Decode a block: None if the checker never wrote it, ``torn=True`` if damaged."""
    if len(buf) < BLOCK_BYTES or bytes(buf[:len(MAGIC)]) != MAGIC:
        return None
    _, version, _, volume, run_id, seq, block = _HEADER.unpack_from(buf)
    (crc,) = _CRC.unpack_from(buf, CRC_OFFSET)
    torn = version != FORMAT_VERSION or zlib.crc32(buf[:CRC_OFFSET]) != crc
    return BlockInfo(run_id, seq, volume, block, torn)


# ------------------------------------------------------------------ the log
@dataclass(frozen=True, slots=True)
class Record:
    """One logged write: global number, volume index, block index, acknowledged or not."""

    seq: int
    volume: int
    block: int
    acked: bool = True


@dataclass
class WriteLog:
    """A parsed writer log: the run's identity and its writes in seq order."""

    run_id: int | None = None
    volumes: int | None = None
    blocks: int | None = None
    devices: list[str] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    dropped_bytes: int = 0  # a partial last line, cut by a kill


def log_header(run_id: int, devices: list[str], blocks: int) -> bytes:
    """The first line of a log."""
    meta = {"format": FORMAT_VERSION, "run_id": run_id, "volumes": len(devices),
            "blocks": blocks, "devices": devices}
    return b"H " + json.dumps(meta).encode() + b"\n"


def log_issued(seq: int, volume: int, block: int) -> bytes:
    return b"I %d %d %d\n" % (seq, volume, block)


def log_acked(seq: int, volume: int, block: int) -> bytes:
    return b"A %d %d %d\n" % (seq, volume, block)


def log_error(seq: int, errno: int | None, error: str) -> bytes:
    return b"E " + json.dumps({"seq": seq, "errno": errno, "error": error}).encode() + b"\n"


def parse_log(data: bytes) -> WriteLog:
    """Decode a log; raises IntegrityError naming the first malformed complete line."""
    out = WriteLog()
    body, _, tail = data.rpartition(b"\n")
    out.dropped_bytes = len(tail)
    issued: dict[int, tuple[int, int]] = {}
    acked: set[int] = set()
    for lineno, line in enumerate(body.split(b"\n") if body else [], 1):
        kind = line[:2]
        try:
            if kind == b"I " or kind == b"A ":
                _, seq_s, volume_s, block_s = line.split(b" ")
                seq, place = int(seq_s), (int(volume_s), int(block_s))
                if seq < 1:
                    raise ValueError(f"seq {seq} is not positive")
                if issued.setdefault(seq, place) != place:
                    raise ValueError(f"seq {seq} names another block than its issued line")
                if kind == b"A ":
                    acked.add(seq)
            elif kind == b"H ":
                if out.run_id is not None:
                    raise ValueError("a second header")
                meta = json.loads(line[2:])
                if meta.get("format") != FORMAT_VERSION:
                    raise ValueError(f"unknown log format {meta.get('format')!r}")
                out.run_id, out.volumes = meta["run_id"], meta["volumes"]
                out.blocks = meta["blocks"]
                out.devices = list(meta.get("devices", []))
            elif kind == b"E ":
                out.errors.append(json.loads(line[2:]))
            else:
                raise ValueError(f"unknown line type {kind!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IntegrityError(f"write log line {lineno}: {e}: {line[:80]!r}") from None
    out.records = [Record(seq, v, b, seq in acked) for seq, (v, b) in sorted(issued.items())]
    return out


# ------------------------------------------------------------------ the verdict
@dataclass
class Verdict:
    """Whether images are a write-order-consistent prefix, and of how much of the log.

    ``prefix_seq`` is the largest K such that every block holds the last write
    numbered <= K (unacked writes may be missing), ``prefix_seq_min`` the smallest;
    both are None when no K exists. ``complete`` means K covers every acked write.
    """

    consistent: bool
    complete: bool
    prefix_seq: int | None
    prefix_seq_min: int | None
    acked_max: int
    issued_max: int
    blocks_checked: int
    blocks_written: int  # blocks holding a write of this run
    torn_blocks: list[tuple[int, int]]  # (volume, block), first TORN_LISTED_MAX
    problems: list[str]  # first PROBLEMS_LISTED_MAX, human-readable
    problem_count: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Problems:
    def __init__(self) -> None:
        self.listed: list[str] = []
        self.count = 0

    def add(self, msg: str) -> None:
        self.count += 1
        if len(self.listed) < PROBLEMS_LISTED_MAX:
            self.listed.append(msg)


def _as_reader(image: Image) -> BlockReader:
    if callable(image):
        return image
    view = memoryview(image).cast("B")
    return lambda i: view[i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES]


def analyse(log: Iterable[Record], images: Mapping[int, Image], blocks_per_volume: int,
            *, run_id: int | None = None) -> Verdict:
    """Judge ``images`` (volume index -> image) against the writes in ``log``.

    For each block b let s_b be the seq it holds (0: initial content) and n_b the
    first acked write to b after s_b. A K exists iff max(s_b) <= min(n_b) - 1, and
    no block is torn or holds a write the log does not place there. Blocks of
    another run (``run_id`` given and different) count as initial content. Only
    the volumes in ``images`` are checked.
    """
    problems = _Problems()
    where: dict[int, tuple[int, int]] = {}  # seq -> (volume, block)
    acked_at: dict[tuple[int, int], list[int]] = {}  # (volume, block) -> acked seqs
    acked_max = issued_max = 0
    ordered = True
    for r in log:
        key = (r.volume, r.block)
        if where.setdefault(r.seq, key) != key:
            problems.add(f"log: seq {r.seq} is logged for two blocks")
        if r.seq <= issued_max:
            ordered = False
        issued_max = max(issued_max, r.seq)
        if r.volume in images and not 0 <= r.block < blocks_per_volume:
            problems.add(f"log: seq {r.seq} writes vol {r.volume} block {r.block}, "
                         f"outside the {blocks_per_volume} blocks checked")
        if r.acked:
            acked_max = max(acked_max, r.seq)
            acked_at.setdefault(key, []).append(r.seq)
    if not ordered:
        for seqs in acked_at.values():
            seqs.sort()

    lower, lower_at = 0, (0, 0)  # max s_b and its block
    upper, upper_at = U64_MAX, ((0, 0), 0)  # min n_b - 1, its block and s_b
    torn: list[tuple[int, int]] = []
    touched = set(where.values())  # blocks this run wrote
    checked = written = 0
    for volume in sorted(images):
        read = _as_reader(images[volume])
        for block in range(blocks_per_volume):
            checked += 1
            key = (volume, block)
            info = parse_block(read(block))
            if info is not None and run_id is not None and info.run_id != run_id \
                    and not (info.torn and key in touched):
                info = None  # another run's leftover: initial content
            if info is not None and info.torn:
                if len(torn) < TORN_LISTED_MAX:
                    torn.append(key)
                problems.add(f"vol {volume} block {block} is torn (crc mismatch)")
                continue
            held = 0
            if info is not None:
                held = info.seq
                logged = where.get(held)
                if logged != key or (info.volume, info.block) != key:
                    why = ("it is not in the log" if logged is None else
                           f"the log puts it at vol {logged[0]} block {logged[1]}"
                           if logged != key else "its header names another block")
                    problems.add(f"vol {volume} block {block} holds seq {held} "
                                 f"(header: vol {info.volume} block {info.block}) but {why}")
                    continue
                written += 1
                if held > lower:
                    lower, lower_at = held, key
            seqs = acked_at.get(key)
            if seqs:
                i = bisect.bisect_right(seqs, held)
                if i < len(seqs) and seqs[i] - 1 < upper:
                    upper, upper_at = seqs[i] - 1, (key, held)
    if lower > upper:
        (uv, ub), held = upper_at
        problems.add(f"not a prefix: vol {lower_at[0]} block {lower_at[1]} holds seq {lower} "
                     f"but vol {uv} block {ub} lacks acked seq {upper + 1} "
                     f"(holds {f'seq {held}' if held else 'initial content'})")
    consistent = problems.count == 0
    prefix = min(upper, issued_max) if consistent else None
    return Verdict(
        consistent=consistent,
        complete=consistent and prefix is not None and prefix >= acked_max,
        prefix_seq=prefix,
        prefix_seq_min=lower if consistent else None,
        acked_max=acked_max,
        issued_max=issued_max,
        blocks_checked=checked,
        blocks_written=written,
        torn_blocks=torn,
        problems=problems.listed,
        problem_count=problems.count,
    )
