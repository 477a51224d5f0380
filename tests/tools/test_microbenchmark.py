"""tools/microbenchmark.py: the best DCP configuration against the best baseline, and the two figures."""
import csv

from tools import microbenchmark as mb


def _write(path, rows):
    cols = ["dataset", "scale", "batch", "backend", "mask", "fwd_ms", "bwd_ms", "status"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def test_speedups_take_the_best_configuration_and_baseline(tmp_path):
    rows = []
    for scale in (1.0, 2.0):
        for backend, fwd, bwd in (("ring", 10, 20), ("zigzag", 8, 30), ("te", 0, 0),
                                  ("dcp(block=64)", 6, 25), ("dcp(block=128)", 4, 18)):
            rows.append({"dataset": "ldc", "scale": scale, "batch": 0, "backend": backend, "mask": "causal",
                         "fwd_ms": fwd * scale, "bwd_ms": bwd * scale,
                         "status": "unavailable" if backend == "te" else "ok"})
    _write(tmp_path / "microbenchmark.csv", rows)
    loaded = mb.load(str(tmp_path / "microbenchmark.csv"))
    assert all(r["family"] != "te" for r in loaded)  # rows that did not run are ignored
    ups = {(u["scale"], u["pass"]): u for u in mb.speedups(loaded)}
    assert ups[(1.0, "fwd")]["best_baseline"] == "zigzag" and ups[(1.0, "fwd")]["speedup"] == 8 / 4
    assert ups[(2.0, "bwd")]["best_baseline"] == "ring" and ups[(2.0, "bwd")]["speedup"] == 40 / 36
    files = mb.plot(loaded, str(tmp_path))
    assert sorted(p.rsplit("/", 1)[1] for p in files) == [
        "microbenchmark_causal.pdf", "microbenchmark_causal.png", "microbenchmark_masks.pdf",
        "microbenchmark_masks.png"]
    assert all((tmp_path / p.rsplit("/", 1)[1]).stat().st_size > 1000 for p in files)
