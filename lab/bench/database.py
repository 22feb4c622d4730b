"""PostgreSQL: db.log_prediction latency, one caller and 8 threads at once, through the pool; the
app's CPU to save an answer with its drawing (conversion and insert) against the answer alone."""

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
            saving = _save_cpu()
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
        Row(SECTION, "app CPU per save: answer alone", saving[0], "ms",
            note=f"process CPU (user+sys), mean of {SAVES} saves"),
        Row(SECTION, "app CPU per save: answer + drawing", saving[1], "ms",
            note=f"drawings.from_canvas of a real {saving[2]}-point mouse drawing + the insert"),
    ]  # fmt: skip


SAVES = 300


def _save_cpu() -> tuple[float, float, int]:
    """Process CPU ms per save, (answer alone, answer with its drawing, points in it): what the
    app spends once per answer, besides the drawing cycle's own work (analysis, page)."""
    import json

    import db
    import drawings
    from lab.bench.common import ROOT

    capture = ROOT / "tests" / "data" / "canvas" / "mouse0.json"  # the longest stroke (146)
    objects = json.loads(capture.read_text())["objects"]

    def cpu_ms(with_drawing: bool) -> float:
        start = time.process_time()
        for n in range(SAVES):
            drawing = drawings.from_canvas(objects, 280, 18, bytes(784)) if with_drawing else None
            db.log_prediction(n % 10, n % 10, 0.5, submission_id=uuid.uuid4(), drawing=drawing)
        return (time.process_time() - start) * 1000 / SAVES

    cpu_ms(True)  # warm-up
    alone, drawn = cpu_ms(False), cpu_ms(True)
    points = sum(len(s) for s in drawings.from_canvas(objects, 280, 18, bytes(784)).strokes)
    return alone, drawn, points
