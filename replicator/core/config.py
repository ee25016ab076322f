"""Every limit and interval of the core, in one place (TigerBeetle style: a limit on everything)."""
from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class Config:
    region_bytes: int = MiB                 # region locks, migrated / activity bitmaps: one bit per region
    diff_block_bytes: int = 4096            # diff_bitmap of a new volume: one bit per block (pair create may choose)
    sync_timeout_s: float = 5.0             # a sync write waits this long for the secondary, then suspends
    sync_batch_writes: int = 64             # sync writes of one volume sharing one round trip, at most
    sync_batch_bytes: int = 8 * MiB         # ... and their data, at most
    sync_batches_in_flight: int = 2         # sync batches of one volume on their way at once
    copy_wait_s: float = 20.0               # an async region copy waits this long at the secondary for the apply
    peer_timeout_s: float = 30.0            # relays, fetches, migration requests
    control_timeout_s: float = 10.0         # small control requests between nodes
    heartbeat_s: float = 0.5                # push heartbeat; also the idle poll of background loops
    link_retry_s: float = 0.2               # after a failed push or pull
    pull_idle_s: float = 0.02               # a pulling secondary with nothing new asks again after this
    push_batch_bytes: int = 4 * MiB         # journal data per push or pull message
    push_batch_entries: int = 1024
    push_window: int = 4                    # pushes of a group in flight at once (a long link's round trip)
    direct_append_bytes_max: int = 256 * 1024   # an async write journaled without a task, at most (core/direct.py)
    push_cache_bytes: int = 32 * MiB        # journal data a group keeps in memory for its push (per group)
    discard_every_s: float = 0.05           # under load, free applied journal space this often
    journal_bytes_default: int = 256 * MiB
    journal_high_water: float = 0.8         # past this fill, async host writes are slowed (back-pressure)
    throttle_max_s: float = 0.5             # by this * x * x per write, x = how far past the mark (0..1)
    journal_bytes_min: int = 1024           # pair create --journal-size: at least this (one 512-byte write)
    reorder_bytes_max: int = 256 * MiB      # default per async group: the secondary's buffer of entries
                                            # waiting for a gap (pair create --reorder-buffer)
    reorder_bytes_bounds: tuple[int, int] = (MiB, 16 << 30)   # what --reorder-buffer may ask
    apply_batch_bytes: int = 8 * MiB        # entries applied per durable batch at the secondary
    pending_hold_max_s: float = 120.0       # a host request waits at most this long in PENDING
    handover_timeout_s: float = 30.0        # V2 gives up the handover after this and goes back to THROUGH
    valid_quick_s: float = 3.0              # S807 waits this long for V3 before V2 goes on
    extents_max: int = 1024                 # NBD block status: runs per answer (the client asks again after)
    copy_hole_regions: int = 256            # dirty regions without data sent as one zero command (initial copy, resync)
    copy_batch_regions: int = 8             # background copy: a run of up to this many regions per message, one sync
    copy_streams: int = 4                   # background copy messages in flight at once (so up to 32 MiB)
    resume_check_s: float = 1.0             # how often suspended pairs try to resume by themselves
    activity_retire_s: float = 1.0          # idle activity-log regions are cleared this often
    activity_idle_s: float = 5.0            # ... once no write reached them for this long (a hot region
                                            # stays set: no bitmap write and fsync before its next write)
    lag_samples_max: int = 4096             # (seq, time) samples kept for lag in seconds
    lag_sample_every_s: float = 0.01
    restart_backoff_s: float = 0.2          # a failed background task is restarted after this (doubling)
    restart_backoff_max_s: float = 5.0
    verify_chunk_bytes: int = 64 * 1024     # online verify compares (and re-reads when busy) this much
    poll_s: float = 0.2                     # polling a peer for a migration report (S815, S820)
