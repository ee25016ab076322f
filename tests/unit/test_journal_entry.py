"""Journal records: encode/decode round trip and refusal of every kind of bad bytes (journal/entry.py)."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from journal import CorruptEntry
from journal.entry import (ENTRY, HEADER_SIZE, MAGIC, WRAP, decode, decode_header, encode, encode_header,
                           encode_wrap)
from replicator.errors import IntegrityError


def test_header_is_40_bytes_and_starts_with_magic():
    rec = encode(7, 3, 4096, b"abc", epoch=2)
    assert len(rec) == HEADER_SIZE + 3 == 43
    assert rec[:4] == MAGIC


@given(seq=st.integers(1, (1 << 64) - 1), vol=st.integers(1, (1 << 32) - 1),
       offset=st.integers(0, (1 << 64) - 1), epoch=st.integers(0, (1 << 32) - 1),
       data=st.binary(max_size=300))
@settings(max_examples=200)
def test_round_trip(seq, vol, offset, epoch, data):
    header, back = decode(encode(seq, vol, offset, data, epoch=epoch) + b"trailing bytes are ignored")
    assert (header.type, header.seq, header.volume_id, header.offset, header.length, header.epoch) == \
        (ENTRY, seq, vol, offset, len(data), epoch)
    assert bytes(back) == data
    assert header.record_bytes == HEADER_SIZE + len(data)


def test_header_then_data_equals_encode():
    assert encode_header(5, 1, 0, b"xyz") + b"xyz" == encode(5, 1, 0, b"xyz")


def test_wrap_marker_round_trip():
    header, data = decode(encode_wrap(99, epoch=4))
    assert (header.type, header.seq, header.epoch, header.length, bytes(data)) == (WRAP, 99, 4, 0, b"")


def test_corrupt_entry_is_an_integrity_error():
    assert issubclass(CorruptEntry, IntegrityError)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: b"XXXX" + r[4:], "magic"),
    (lambda r: r[:4] + b"\x09" + r[5:], "version"),
    (lambda r: r[:5] + b"\x07" + r[6:], "type"),
    (lambda r: r[:6] + b"\x01\x00" + r[8:], "flags"),
    (lambda r: r[:12] + struct.pack("<Q", 0) + r[20:], "sequence number 0"),
    (lambda r: r[:HEADER_SIZE + 2], "torn"),
    (lambda r: r[:20], "truncated"),
    (lambda r: r[:-1] + bytes([r[-1] ^ 1]), "crc"),                  # data bit flip
    (lambda r: r[:24] + bytes([r[24] ^ 0x80]) + r[25:], "crc"),      # offset bit flip
    (lambda r: r[:32] + struct.pack("<I", 1 << 30) + r[36:], "torn"),  # length too large
])
def test_decode_rejects(mutate, message):
    rec = encode(3, 1, 512, b"0123456789")
    with pytest.raises(CorruptEntry, match=message):
        decode(mutate(rec))


def test_wrap_marker_with_data_fields_is_rejected():
    rec = bytearray(encode_wrap(5))
    rec[24] = 1  # offset
    with pytest.raises(CorruptEntry, match="wrap"):
        decode_header(bytes(rec))


@pytest.mark.parametrize("kwargs, field", [
    (dict(seq=0, volume_id=1, offset=0), "seq"), (dict(seq=1, volume_id=0, offset=0), "volume_id"),
    (dict(seq=1, volume_id=1, offset=-1), "offset"), (dict(seq=1 << 64, volume_id=1, offset=0), "seq"),
    (dict(seq=1, volume_id=1 << 32, offset=0), "volume_id"), (dict(seq=1, volume_id=1, offset=0, epoch=-1), "epoch"),
])
def test_encode_refuses_out_of_range_fields(kwargs, field):
    with pytest.raises(ValueError, match=f"field {field}="):
        encode(data=b"x", **kwargs)


@given(st.binary(max_size=120))
@settings(max_examples=300)
def test_decode_fuzz_raises_only_corrupt_entry(buf):
    try:
        decode(buf)
    except CorruptEntry:
        pass


@given(st.integers(0, HEADER_SIZE + 15), st.integers(1, 255))
def test_any_single_byte_change_is_detected(at, xor):
    rec = bytearray(encode(42, 2, 8192, bytes(range(16)), epoch=3))
    rec[at] ^= xor
    with pytest.raises(CorruptEntry):
        decode(bytes(rec))
