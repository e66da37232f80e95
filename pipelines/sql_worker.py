"""The child process that runs untrusted SQL for `pipelines.sql.execute` (stdlib only).

`pipelines.sql` starts a few of these (`python -I -S sql_worker.py <limits>`) and sends one
query at a time over stdin; each answer goes back on stdout. A query runs here, not in the
caller, so that nothing it does can exceed what this process is allowed: its address space is
capped (RLIMIT_AS), SQLite's heap below that (`hard_heap_limit`), every string or blob it builds
(SQLITE_LIMIT_LENGTH), the rows and bytes it returns, and temporary tables live in that capped
memory instead of on disk. The parent kills the process when a query overruns its deadline (a
SQL function such as `printf('%.*c', 1e9, 'x')` runs seconds without a VM step, which the
progress handler cannot interrupt). The authorizer refuses what the read-only guard refuses,
once more on SQLite's own parse of the statement: PRAGMAs (and `pragma_*` table-valued
functions), ATTACH/DETACH and functions that reach outside the database.

Frames in both directions: 4-byte big-endian length + pickle. Request: (db path, SQL, time limit
in s, max rows, max result bytes); answer: (rows, columns, error, truncated).
"""

import os
import pickle
import resource
import sqlite3
import struct
import sys
import time

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
