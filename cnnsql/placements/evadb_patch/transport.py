"""Moving rows from PostgreSQL to EvaDB: one chunk ahead of the caller, and by binary COPY.

Measured on the 10,000 test images (`SELECT id, label, img` from the binary twin, one process,
load average 13 on the 2-core machine): through the server-side cursor 186-222 ms of client CPU
(psycopg2 parses bytea from its hex text form), by `COPY ... (FORMAT binary)` parsed here 32-67 ms.
"""
from __future__ import annotations

import queue
import struct
import threading
from typing import Callable, Iterator

import psycopg2

from cnnsql.core.errors import CnnsqlError

SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_INT16, _INT32, _INT64, _FLOAT64 = (struct.Struct(f) for f in (">h", ">i", ">q", ">d"))
# Types whose binary form converts to exactly the Python value psycopg2 gives from text. float4 is
# not here: psycopg2 reads its shortest decimal text ("0.1"), binary gives the float32 (0.10000000149).
DECODERS: dict[str, Callable[[memoryview], object]] = {
    "int2": lambda b: _INT16.unpack(b)[0],
    "int4": lambda b: _INT32.unpack(b)[0],
    "int8": lambda b: _INT64.unpack(b)[0],
    "float8": lambda b: _FLOAT64.unpack(b)[0],
    "bool": lambda b: b[0] != 0,
    "bytea": bytes,
    "text": lambda b: str(b, "utf-8"),
    "varchar": lambda b: str(b, "utf-8"),
    "name": lambda b: str(b, "utf-8"),
}


# The binary form's exact size of the fixed-size types; a field of another size is a malformed stream.
FIXED_SIZE = {"int2": 2, "int4": 4, "int8": 8, "float8": 8, "bool": 1}
# Variable-size fields (bytea, text): at most this many bytes each (a stored image of the largest model
# input cnnsql accepts is 1 MiB; text values are names), and a header extension at most this much.
MAX_FIELD_BYTES = 64 << 20
MAX_EXTENSION_BYTES = 1 << 20


class MalformedCopy(ValueError):
    """The server's COPY bytes do not follow the binary COPY format (a broken or hostile server)."""


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


def push_ahead(produce: Callable[[Callable[[object], bool]], None]) -> Iterator:
    """The items that `produce(put)` puts, produced by a thread while the caller works on the
    previous one (one item ahead, so memory stays bounded). `put` returns False once the caller has
    stopped; `produce` should then return. psycopg2 releases the GIL while it waits for the server,
    so reading the next chunk overlaps the CNN on this one. An exception is raised in the caller; a
    caller that stops early waits for the thread, so the producer's cleanup has run on return."""
    slot: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slot.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            produce(put)
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            put(_Raised(exc))

    thread = threading.Thread(target=run, name="cnnsql-read-ahead", daemon=True)
    thread.start()
    try:
        while (item := slot.get()) is not _END:
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


def read_ahead(items: Iterator) -> Iterator:
    """The items of the iterator `items`, each next one produced by a thread (see push_ahead); `items`
    is closed, in that thread, before this generator returns."""
    def produce(put) -> None:
        try:
            for item in items:
                if not put(item):
                    return
        finally:
            items.close()

    return push_ahead(produce)


class BinaryCopyParser:
    """Rows of PostgreSQL's binary COPY format from the byte pieces COPY sends, as tuples of Python
    values (None for NULL), decoded by each column's type name (DECODERS).

    The bytes are not trusted: a negative length other than -1 (NULL), a fixed-size field of the wrong
    size, a field over MAX_FIELD_BYTES, a negative or oversized header extension and any byte after the
    trailer raise MalformedCopy; `finish()` raises it unless the stream ended with its trailer, so a
    truncated stream is an error, never a short answer."""

    def __init__(self, types: list[str], max_field_bytes: int = MAX_FIELD_BYTES):
        self.decoders = [DECODERS[t] for t in types]
        self.sizes = [FIXED_SIZE.get(t) for t in types]
        self.max_field = max_field_bytes
        self.buffer = bytearray()
        self.header_done = False
        self.finished = False

    def finish(self) -> None:
        """The stream is over: it must have ended with the trailer and nothing after it."""
        if not self.finished:
            raise MalformedCopy(f"binary COPY stream ended without its trailer ({len(self.buffer)} bytes of an "
                                "incomplete row or header left)")

    def feed(self, data) -> list[tuple]:
        if self.finished:
            if len(data):
                raise MalformedCopy("binary COPY data after the trailer")
            return []
        self.buffer += data
        rows, pos, view = [], 0, memoryview(self.buffer)
        try:
            if not self.header_done:
                pos = self._header(view)
                if pos == 0:
                    return rows
                self.header_done = True
            while (row := self._row(view, pos)) is not None:
                values, pos = row
                if values is None:
                    self.finished = True
                    if pos != len(view):
                        raise MalformedCopy("binary COPY data after the trailer")
                    break
                rows.append(values)
        finally:
            view.release()
        del self.buffer[:pos]
        return rows

    def _header(self, view: memoryview) -> int:
        if len(view) < 19:
            return 0
        if bytes(view[:11]) != SIGNATURE:
            raise MalformedCopy("not PostgreSQL binary COPY data")
        extension = _INT32.unpack_from(view, 15)[0]
        if not 0 <= extension <= MAX_EXTENSION_BYTES:
            raise MalformedCopy(f"binary COPY header extension of {extension} bytes")
        return 19 + extension if len(view) >= 19 + extension else 0

    def _row(self, view: memoryview, pos: int):
        """((values or None at the trailer), next position), or None when the row is incomplete."""
        if len(view) < pos + 2:
            return None
        fields = _INT16.unpack_from(view, pos)[0]
        if fields == -1:
            return None, pos + 2
        if fields != len(self.decoders):
            raise MalformedCopy(f"binary COPY row has {fields} fields, expected {len(self.decoders)}")
        at, values = pos + 2, []
        for decode, fixed in zip(self.decoders, self.sizes):
            if len(view) < at + 4:
                return None
            size = _INT32.unpack_from(view, at)[0]
            at += 4
            if size == -1:
                values.append(None)
                continue
            if size < 0 or (fixed is not None and size != fixed) or size > self.max_field:
                raise MalformedCopy(f"binary COPY field of {size} bytes" + (f", expected {fixed}" if fixed else ""))
            if len(view) < at + size:
                return None
            try:
                values.append(decode(view[at:at + size]))
            except (UnicodeDecodeError, struct.error) as exc:
                raise MalformedCopy(f"binary COPY field does not decode: {exc}") from None
            at += size
        return tuple(values), at


def copy_rows(conn, trusted_select: str, types: list[str], sizes: Iterator[int]) -> Iterator[list[tuple]]:
    """Lists of rows of `trusted_select` (a complete SELECT that the caller built with psycopg2.sql and
    mogrified: identifiers and values already quoted; never text from a user) read by `COPY (select) TO STDOUT (FORMAT binary)` in a thread, the k-th list
    holding next(sizes) rows (the last may be shorter). The connection must be in autocommit mode
    (COPY then is its own statement). A caller that stops early cancels the COPY on the server
    (psycopg2's `cancel()`, safe from any thread) and leaves the connection usable."""
    text = f"COPY ({trusted_select}) TO STDOUT (FORMAT binary)"

    def produce(put) -> None:
        parser, rows, state = BinaryCopyParser(types), [], {"size": next(sizes), "stopped": False}

        class Sink:
            def write(self, data) -> None:
                if state["stopped"]:
                    return
                rows.extend(parser.feed(data))
                while len(rows) >= state["size"]:
                    chunk, rows[:] = rows[:state["size"]], rows[state["size"]:]
                    state["size"] = next(sizes)
                    if not put(chunk):
                        state["stopped"] = True
                        conn.cancel()
                        return

        try:
            with conn.cursor() as cursor:
                cursor.copy_expert(text, Sink(), size=1 << 16)
            if not state["stopped"]:
                parser.finish()
        except psycopg2.extensions.QueryCanceledError:
            if state["stopped"]:
                return
            raise
        except MalformedCopy as exc:
            conn.close()  # the server's bytes cannot be trusted: no further statement on this connection
            raise CnnsqlError(f"the PostgreSQL server sent a malformed COPY stream: {exc}",
                              "check the server (and use TLS on a network DSN); no rows were used") from None
        if state["stopped"]:  # COPY ended before the cancel landed: it could hit the next statement
            conn.close()
            return
        if not state["stopped"] and rows:
            put(list(rows))

    return push_ahead(produce)
