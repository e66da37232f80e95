"""The processes that run untrusted SQL for `pipelines.sql.execute`, and the pool driving them.

`pool(limits)` keeps a few children (`python -I -S sql_worker.py <limits>`: the standard library
only, which is all this module imports) and sends each one query at a time over stdin; each
answer goes back on stdout. A query runs in a child, not in the caller, so that nothing it does
can exceed what the child is allowed: its address space is capped (RLIMIT_AS), SQLite's heap
below that (`hard_heap_limit`), every string or blob it builds (SQLITE_LIMIT_LENGTH), the rows
and bytes it returns; temporary tables live in that capped memory instead of on disk. The pool
kills a child when a query overruns its deadline (a SQL function such as
`printf('%.*c', 1e9, 'x')` runs seconds without a VM step, which the progress handler cannot
interrupt). The authorizer refuses what the read-only guard refuses, once more on SQLite's own
parse of the statement: PRAGMAs (and `pragma_*` table-valued functions), ATTACH/DETACH and
functions that reach outside the database.

Frames in both directions: 4-byte big-endian length + pickle. Request: (db path, SQL, time limit
in s, max rows, max result bytes); answer: (rows, columns, error, truncated).
"""

from __future__ import annotations

import atexit
import os
import pickle
import resource
import select
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.config import SQLConfig

MEMORY_LIMIT = "memory limit"  # the answer after which the parent retires this process
DENIED_FUNCTIONS = {"fts3_tokenizer", "load_extension", "readfile", "writefile", "edit"}
_DENIED_ACTIONS = {sqlite3.SQLITE_PRAGMA, sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH}


def _authorize(action: int, arg1: str | None, arg2: str | None, db: object, src: object) -> int:
    if action in _DENIED_ACTIONS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def _size(value: object) -> int:
    return len(value) if isinstance(value, (str, bytes)) else 8


def run_query(request: tuple, max_value_bytes: int, heap_bytes: int) -> tuple:
    """(rows, columns, error, truncated) of one request; never raises."""
    db, sql, timeout_s, max_rows, max_result_bytes = request
    deadline = time.monotonic() + timeout_s
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error as e:
        return [], [], f"database: {e}", False
    try:
        conn.execute(f"PRAGMA hard_heap_limit = {heap_bytes}")
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute("PRAGMA query_only = ON")
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_value_bytes)
        conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        conn.set_authorizer(_authorize)
        # A non-zero return from the handler interrupts the query ("interrupted").
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
        cur = conn.execute(sql)
        columns = [d[0] for d in cur.description or []]
        rows, size = [], 0
        for row in cur:
            if len(rows) == max_rows:
                return rows, columns, None, True
            size += sum(_size(v) for v in row)
            if size > max_result_bytes:
                return [], columns, f"result larger than {max_result_bytes} bytes", False
            rows.append(row)
        return rows, columns, None, False
    except sqlite3.OperationalError as e:
        if "interrupted" in str(e):
            return [], [], "timeout", False
        if "out of memory" in str(e):
            return [], [], MEMORY_LIMIT, False
        if "not authorized" in str(e):
            return [], [], "rejected: not authorized (PRAGMA, ATTACH or a denied function)", False
        return [], [], f"error: {e}", False
    except (sqlite3.Error, OverflowError, ValueError) as e:  # DataError: string or blob too big
        return [], [], f"error: {e}", False
    except MemoryError:
        return [], [], MEMORY_LIMIT, False
    finally:
        conn.close()


class _Worker:
    """One `sql_worker.py` process and its pipes; killed when it overruns a deadline."""

    def __init__(self, limits: SQLConfig):
        # -I -S: the standard library only, nothing from the environment or site-packages.
        args = [str(limits.max_memory_mb), str(limits.max_value_bytes)]
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(Path(__file__).resolve()), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )

    def ask(self, request: tuple, deadline: float, max_bytes: int) -> tuple | str:
        """The worker's answer, or why there is none ("timeout", "worker died")."""
        data = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            view = memoryview(struct.pack("!I", len(data)) + data)
            while view:  # a raw pipe may take part of a large write
                view = view[self.proc.stdin.write(view) :]
            head = self._read(4, deadline)
            size = struct.unpack("!I", head)[0] if head else None
            if size is not None and size > max_bytes:
                return f"result larger than {max_bytes} bytes"
            body = self._read(size, deadline) if size is not None else None
        except OSError:
            body = None
        if body is None:
            return "worker died" if self.proc.poll() is not None else "timeout"
        return pickle.loads(body)

    def _read(self, n: int, deadline: float) -> bytes | None:
        fd, buf = self.proc.stdout.fileno(), bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class _Pool:
    """Up to `limits.workers` idle workers, reused; one query per worker at a time."""

    def __init__(self, limits: SQLConfig):
        self.limits = limits
        self.idle: list[_Worker] = []
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(limits.workers)

    def run(self, request: tuple, deadline: float) -> tuple | str:
        max_bytes = 2 * self.limits.max_result_bytes + (1 << 20)  # pickle overhead included
        with self.slots:
            with self.lock:
                worker = self.idle.pop() if self.idle else None
            worker = worker or _Worker(self.limits)
            answer = worker.ask(request, deadline, max_bytes)
            # Stuck in a query, gone, or at its memory limit (glibc keeps what it grew to and
            # the next query would start short): never reused.
            if isinstance(answer, str) or answer[2] == MEMORY_LIMIT:
                worker.kill()
            else:
                with self.lock:
                    self.idle.append(worker)
            return answer

    def close(self) -> None:
        with self.lock:
            for worker in self.idle:
                worker.kill()
            self.idle.clear()


_POOLS: dict[tuple[int, SQLConfig], _Pool] = {}
_POOLS_LOCK = threading.Lock()


def pool(limits: SQLConfig) -> _Pool:
    """The pool for these limits in this process."""
    # Keyed by process id too: a forked child must not share its parent's pipes.
    key = (os.getpid(), limits)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = _Pool(limits)
        return _POOLS[key]


@atexit.register
def _close_pools() -> None:
    for (pid, _), each in list(_POOLS.items()):
        if pid == os.getpid():
            each.close()


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def main() -> None:
    max_memory_mb, max_value_bytes = int(sys.argv[1]), int(sys.argv[2])
    limit = max_memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # SQLite gives up (a clean "out of memory") well before the process hits its limit.
    heap_bytes = limit // 2
    rfd, wfd = sys.stdin.fileno(), sys.stdout.fileno()
    while True:
        head = _read_exact(rfd, 4)
        if head is None:
            return  # the parent went away
        request = pickle.loads(_read_exact(rfd, struct.unpack("!I", head)[0]) or b"")
        try:
            answer = run_query(request, max_value_bytes, heap_bytes)
            data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        except MemoryError:
            data = pickle.dumps(([], [], MEMORY_LIMIT, False))
        os.write(wfd, struct.pack("!I", len(data)))
        view = memoryview(data)
        while view:
            view = view[os.write(wfd, view) :]


if __name__ == "__main__":
    main()
