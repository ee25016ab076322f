"""The write-ahead journal of an asynchronous consistency group at its primary (SPEC 5.2, 5.3).

FORMAT.md documents the bytes on disk and how recovery reads them. entry.py
encodes and decodes one record (no I/O). ring.py keeps the records in a
persistent ring with the stored/transferred/applied/discarded pointers.
"""
from .entry import CorruptEntry, Entry
from .ring import Journal, JournalFull, Recovery

__all__ = ["CorruptEntry", "Entry", "Journal", "JournalFull", "Recovery"]
