"""bench/registry_sync.py N: commit latency of one-row transactions in SQLite WAL mode, synchronous NORMAL vs FULL, on
this disk: the cost of making every acknowledged registry write durable."""
import os, shutil, sqlite3, sys, tempfile, time
n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
for mode in ("NORMAL", "FULL"):
    d = tempfile.mkdtemp(dir=os.environ.get("BENCH_DIR", "."))  # on the disk under test
    db = sqlite3.connect(os.path.join(d, "r.db"), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL"); db.execute(f"PRAGMA synchronous={mode}")
    db.execute("CREATE TABLE objects (kind TEXT, account_id TEXT, key TEXT, doc TEXT, PRIMARY KEY (kind, account_id, key))")
    doc = "x" * 400
    t = time.perf_counter()
    for i in range(n):
        db.execute("BEGIN"); db.execute("INSERT INTO objects VALUES ('thing','1',?,?)", (str(i), doc)); db.execute("COMMIT")
    dt = time.perf_counter() - t
    print(f"{mode}: {n} commits in {dt:.3f} s = {n/dt:.0f}/s, {dt/n*1e6:.0f} us each")
    db.close()
    shutil.rmtree(d, ignore_errors=True)
