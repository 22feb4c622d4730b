"""PostgreSQL: db.log_prediction latency, one caller and 8 threads at once, through the pool."""

from __future__ import annotations

import threading
import time
import uuid

from lab.bench.common import Row, at_most, percentile, postgres_server

SECTION = "Database"
SEQUENTIAL = 1000
THREADS = 8
PER_THREAD = 250
TARGET_P99_MS = 20


def _insert(n: int) -> float:
    import db

    start = time.perf_counter()
    db.log_prediction(n % 10, (n * 7) % 10, 0.5 + (n % 50) / 100, submission_id=uuid.uuid4())
    return (time.perf_counter() - start) * 1000


def run() -> list[Row]:
    import db

    with postgres_server(durable=True) as server:
        db.configure(server.url)
        try:
            db.init_db()
            for n in range(50):  # warm-up: the pool's connections, the server's caches
                _insert(n)
            sequential = [_insert(n) for n in range(SEQUENTIAL)]

            latencies: list[list[float]] = [[] for _ in range(THREADS)]
            barrier = threading.Barrier(THREADS + 1)

            def worker(index: int) -> None:
                barrier.wait()
                latencies[index].extend(_insert(n) for n in range(PER_THREAD))

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
            for thread in threads:
                thread.start()
            barrier.wait()
            start = time.perf_counter()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - start
            stored = db.count_predictions()
        finally:
            db.configure(None)
    concurrent = [value for values in latencies for value in values]
    expected = 50 + SEQUENTIAL + THREADS * PER_THREAD
    where = f"pool of {db.POOL_MAX_SIZE} connections, fsync on, data dir on local disk"
    return [
        Row(SECTION, f"insert latency p50 ({SEQUENTIAL} sequential)",
            percentile(sequential, 50), "ms", note=where),
        at_most(SECTION, f"insert latency p99 ({SEQUENTIAL} sequential)",
                percentile(sequential, 99), "ms", TARGET_P99_MS, note=where),
        Row(SECTION, f"insert throughput, {THREADS} threads", len(concurrent) / elapsed, "rows/s",
            note=f"{THREADS} x {PER_THREAD} inserts; {stored}/{expected} rows stored"),
        Row(SECTION, f"insert latency p50, {THREADS} threads", percentile(concurrent, 50), "ms"),
        at_most(SECTION, f"insert latency p99, {THREADS} threads", percentile(concurrent, 99),
                "ms", TARGET_P99_MS, note="includes waiting for a free pooled connection"),
    ]  # fmt: skip
