"""The binary COPY parser does not trust the server's bytes: every stream, however malformed, gives the
rows it encodes or one MalformedCopy error, quickly, and a stream that stops early is an error, never a
short answer. Streams are built here in PostgreSQL's binary COPY format (the conformance tests check
the parser against a real server's bytes)."""
from __future__ import annotations

import random
import struct
import time

import pytest

from cnnsql.placements.evadb_patch.transport import SIGNATURE, BinaryCopyParser, MalformedCopy

TYPES = ["int4", "bytea"]


def stream(rows, extension: bytes = b"") -> bytes:
    out = bytearray(SIGNATURE + struct.pack(">ii", 0, len(extension)) + extension)
    for rid, img in rows:
        out += struct.pack(">h", 2) + struct.pack(">ii", 4, rid)
        out += struct.pack(">i", -1) if img is None else struct.pack(">i", len(img)) + img
    return bytes(out + struct.pack(">h", -1))


def parse(data: bytes, step: int = 7, types=TYPES) -> list[tuple]:
    parser, rows = BinaryCopyParser(types, max_field_bytes=4096), []
    for at in range(0, len(data), step):
        rows += parser.feed(data[at:at + step])
    parser.finish()
    return rows


ROWS = [(i, bytes(random.Random(i).randbytes(96))) for i in range(20)] + [(20, None)]


def test_a_good_stream_in_any_pieces():
    for step in (1, 5, 64, 10_000):
        assert parse(stream(ROWS), step) == ROWS
    assert parse(stream(ROWS, extension=b"x" * 8)) == ROWS


def test_a_negative_field_length_is_an_error_not_an_endless_loop():
    bad = bytearray(stream(ROWS))
    first_bytea = len(SIGNATURE) + 8 + 2 + 8  # header, field count, the int4 field
    bad[first_bytea:first_bytea + 4] = struct.pack(">i", -6)
    with pytest.raises(MalformedCopy, match="field of -6 bytes"):
        parse(bytes(bad))


def test_a_negative_header_extension_is_an_error_not_zero_rows():
    bad = bytearray(stream(ROWS))
    bad[15:19] = struct.pack(">i", -19)
    with pytest.raises(MalformedCopy, match="extension of -19 bytes"):
        parse(bytes(bad))


@pytest.mark.parametrize("cut", [1, 10, 19, 40, -3, -2, -1])
def test_a_stream_that_stops_early_is_an_error(cut):
    data = stream(ROWS)
    with pytest.raises(MalformedCopy, match="ended without its trailer"):
        parse(data[:cut] if cut > 0 else data[:len(data) + cut])


def test_fixed_sizes_caps_and_trailing_bytes():
    bad = bytearray(stream(ROWS))
    bad[len(SIGNATURE) + 8 + 2:len(SIGNATURE) + 8 + 6] = struct.pack(">i", 8)  # an int4 of 8 bytes
    with pytest.raises(MalformedCopy, match="expected 4"):
        parse(bytes(bad))
    with pytest.raises(MalformedCopy, match="field of 5000 bytes"):
        parse(stream([(1, bytes(5000))]))  # over the cap: refused before it is buffered
    with pytest.raises(MalformedCopy, match="after the trailer"):
        parse(stream(ROWS) + b"\x00\x01")


def test_fuzzed_streams_give_rows_or_one_error_quickly():
    """2,000 random mutations of a valid stream (flipped, inserted, deleted bytes; lengths overwritten),
    fed in random pieces: each ends in well-formed rows or MalformedCopy, and all of them in seconds."""
    rng, good = random.Random(1), stream(ROWS)
    outcomes = {"rows": 0, "error": 0}
    t0 = time.perf_counter()
    for _ in range(2000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            k = rng.randrange(len(data))
            op = rng.choice(("flip", "insert", "delete", "length"))
            if op == "flip":
                data[k] ^= 1 << rng.randrange(8)
            elif op == "insert":
                data[k:k] = rng.randbytes(rng.randint(1, 8))
            elif op == "delete":
                del data[k:k + rng.randint(1, 8)]
            else:
                data[k:k + 4] = struct.pack(">i", rng.choice((-2, -7, -2**31, 2**31 - 1, 0, 3, 4096, 4097)))
        try:
            rows = parse(bytes(data), rng.randint(1, 300))
        except MalformedCopy:
            outcomes["error"] += 1
            continue
        assert all(isinstance(i, int) and (img is None or (isinstance(img, bytes) and len(img) <= 4096))
                   for i, img in rows)
        outcomes["rows"] += 1
    assert time.perf_counter() - t0 < 30 and outcomes["error"] > 1000 and sum(outcomes.values()) == 2000
