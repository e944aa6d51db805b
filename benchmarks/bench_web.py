"""Local load test of the web app (``mechscope serve``) on a feature database of >= 100k features.

    .venv/bin/python benchmarks/bench_web.py                 # ~4 min on 2 shared cores
    .venv/bin/python benchmarks/bench_web.py --quick         # fewer requests
    .venv/bin/python benchmarks/bench_web.py --map           # also UMAP of all decoder rows (minutes)

Set-up: smollm2-135m (the embedded default model) with a random TopK SAE of ``--features`` latents
(default 102,400) on ``blocks.6.hook_resid_post``, and a feature database *for that SAE* at full size:
every table has the documented schema and a realistic number of rows (a row per feature, 8 example
windows of 24 tokens, 20 logit effects and 8 neighbours per feature), with synthetic values, since
building a real one for 100k latents takes ~15 min of logit effects and neighbours on a CPU
(``bench_features.py --wide``). ``meta.json`` carries the SAE's SHA-256 and the model's fingerprint,
so the app opens it with the model and SAE exactly as it opens a built one.

The server runs in a child process (uvicorn, as ``mechscope serve`` runs it); the parent sends
requests from ``--clients`` threads (each request waits for its answer, then the next is sent) and
reports latency percentiles per endpoint, measured at the client (HTTP included):

* ``feature page``: ``GET /feature/{random id}``, the dashboard HTML (point lookups in 4 tables);
* ``feature JSON``: ``GET /api/feature/{random id}``;
* ``index``: ``GET /?order=max&desc=true&page=random``: a DuckDB ``ORDER BY`` over every row;
* ``explanation search``: ``GET /?q=word``: ``ILIKE`` over every explanation;
* ``text search``: ``GET /api/search?text=...``: a live forward of the model (``run_with_cache``), the
  SAE encoder over all latents, and the lookups of the firing features; texts are 20-40 word windows
  of the default corpus.

Nothing is loaded up front: the server's resident memory is printed before and after the load.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pyarrow as pa

MODEL, HOOK = "smollm2-135m", "blocks.6.hook_resid_post"
PER, W = 8, 24  # example windows per feature (4 top, 2 intervals x 2), tokens per window
WORDS = [
    "cats",
    "dogs",
    "verbs",
    "numbers",
    "French",
    "code",
    "names",
    "the end of a sentence",
    "Shakespeare",
]


def make_sae(model, n: int):
    from mechscope.saes.arch import make_sae as _make
    from mechscope.saes.sae import SAEConfig

    return _make(SAEConfig(d_in=model.cfg.d_model, d_sae=n, kind="topk", k=32, hook_name=HOOK, seed=0))


def _lists(values: np.ndarray, width: int, dtype) -> pa.Array:
    offsets = pa.array(np.arange(0, values.size + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), dtype))


def write_db(root: Path, model, sae, n: int) -> None:
    """A full-size database for ``sae`` with synthetic values (see the module docstring)."""
    from mechscope.features import write_database
    from mechscope.features.sources import sae_sha256
    from mechscope.saes.harvest import model_fingerprint

    rng = np.random.default_rng(0)
    V = model.cfg.d_vocab
    ids = np.arange(n)
    density = 10 ** rng.uniform(-6, -1, n)
    n_ex = n * PER
    acts = rng.random((n_ex, W), dtype=np.float32)
    kind = np.where(np.arange(n_ex) % PER < 4, "top", "quantile")
    interval = pa.array((np.arange(n_ex) % PER - 4) // 2, type=pa.int32(), mask=kind == "top")
    tables = {
        "features": pa.table(
            {
                "id": ids,
                "density": density,
                "n_firing": (density * 1e6).astype(np.int64),
                "mean": density * 0.5,
                "mean_firing": np.full(n, 0.5),
                "max": acts.reshape(n, -1).max(1),
                "histogram": _lists(rng.integers(0, 100, (n, 66)), 66, pa.int64()),
                "explanation": [f"{WORDS[i % len(WORDS)]} in context {i}" for i in ids],
                "score": rng.random(n),
            }
        ),
        "examples": pa.table(
            {
                "feature": np.repeat(ids, PER),
                "kind": kind,
                "interval": interval,
                "rank": (np.arange(n_ex) % PER) % 4 % 2,
                "value": acts.max(1),
                "context": rng.integers(0, 10**6, n_ex),
                "position": np.full(n_ex, 18),
                "window_start": np.zeros(n_ex, dtype=np.int32),
                "tokens": _lists(rng.integers(0, V, (n_ex, W)), W, pa.int32()),
                "activations": _lists(acts, W, pa.float32()),
                "document": np.zeros(n_ex, dtype=np.int32),
                "source": ["synthetic"] * n_ex,
                "token_offset": np.zeros(n_ex, dtype=np.int32),
                "char_offset": np.zeros(n_ex, dtype=np.int32),
            }
        ),
        "logits": pa.table(
            {
                "feature": np.repeat(ids, 20),
                "kind": np.tile(np.repeat(["promoted", "suppressed"], 10), n),
                "rank": np.tile(np.r_[np.arange(10), np.arange(10)], n),
                "token": rng.integers(0, V, 20 * n),
                "token_str": ["tok"] * (20 * n),
                "value": rng.standard_normal(20 * n).astype(np.float32),
            }
        ),
        "neighbours": pa.table(
            {
                "feature": np.repeat(ids, 8),
                "rank": np.tile(np.arange(8), n),
                "neighbour": rng.integers(0, n, 8 * n),
                "cosine": rng.random(8 * n, dtype=np.float32),
            }
        ),
        "vocab": pa.table(
            {"token": np.arange(V), "str": model.tokenizer.convert_ids_to_tokens(list(range(V)))}
        ),
    }
    meta = {
        "model": MODEL,
        "model_fingerprint": model_fingerprint(model),
        "source": {
            "kind": "sae",
            "hook": HOOK,
            "n_features": n,
            "sae_kind": sae.cfg.kind,
            "sae_config": sae.cfg.to_dict(),
            "sae_sha256": sae_sha256(sae),
        },
        "corpus": {"name": "synthetic (benchmark)"},
        "config": {"n_quantiles": 2},
        "n_features": n,
        "n_tokens": 10**7,
        "hist_edges": list(np.logspace(-4, 4, 65)),
    }
    write_database(root, tables, meta)


def serve(db: str, n: int, port: int, ready, do_map: bool) -> None:
    """The child: load the model and SAE, open the app, (optionally compute the map), serve."""
    import torch
    import uvicorn

    import mechscope as ms
    from mechscope.web import create_app

    torch.set_num_threads(1)
    model = ms.load_model(MODEL)
    sae = make_sae(model, n)
    app = create_app(db, model, sae)
    if do_map:
        from mechscope.features.umap_map import feature_map

        t = time.perf_counter()
        feature_map(app.state.db, model, sae)
        print(json.dumps({"umap_seconds": round(time.perf_counter() - t, 1)}), flush=True)
    ready.set()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def load(base: str, make_url, n_requests: int, clients: int) -> dict:
    """``n_requests`` GETs spread over ``clients`` threads; latency percentiles in ms."""
    import httpx

    times: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    per = n_requests // clients

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=base, timeout=120) as c:
            for _ in range(per):
                url = make_url(rng)
                t = time.perf_counter()
                r = c.get(url)
                dt = time.perf_counter() - t
                with lock:
                    times.append(dt)
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {url[:80]}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(s,)) for s in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms_ = sorted(1000 * t for t in times)
    return {
        "requests": len(ms_),
        "clients": clients,
        "p50_ms": round(statistics.median(ms_), 1),
        "p95_ms": round(ms_[int(0.95 * (len(ms_) - 1))], 1),
        "max_ms": round(ms_[-1], 1),
        "req_per_s": round(len(ms_) / wall, 1),
        "errors": errors[:3],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--features", type=int, default=102_400)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--map", action="store_true", help="also compute (and time) the UMAP map")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args()
    n_req = 80 if args.quick else 400
    n_search = 20 if args.quick else 100

    import torch

    import mechscope as ms
    from mechscope.data.corpus import default_corpus
    from mechscope.features import FeatureDB

    sys_info = {"nproc": os.cpu_count(), "torch": torch.__version__}
    tmp = Path(tempfile.mkdtemp(prefix="bench_web_"))
    try:
        model = ms.load_model(MODEL)
        sae = make_sae(model, args.features)
        t = time.perf_counter()
        write_db(tmp / "db", model, sae, args.features)
        build_s = time.perf_counter() - t
        with FeatureDB.open(tmp / "db") as db:
            rows = {
                n: db.sql(f"SELECT count(*) AS c FROM {n}").column(0)[0].as_py()
                for n in ("features", "examples", "logits", "neighbours")
            }
        size_mb = sum(f.stat().st_size for f in (tmp / "db").iterdir()) / 2**20
        del model, sae
        docs = [d.text for d in default_corpus()][:200]
        words = " ".join(docs).split()
        texts = [" ".join(words[i : i + random.Random(i).randint(20, 40)]) for i in range(0, 400_000, 997)]

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        proc = ctx.Process(target=serve, args=(str(tmp / "db"), args.features, port, ready, args.map))
        proc.start()
        if not ready.wait(1800):
            raise RuntimeError("the server did not start")
        base = f"http://127.0.0.1:{port}"
        import httpx

        for _ in range(200):  # uvicorn binds just after ready
            try:
                httpx.get(base + "/api/info", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        rss0 = rss_mb(proc.pid)
        n = args.features
        endpoints = {
            "feature page": (lambda r: f"/feature/{r.randrange(n)}", n_req),
            "feature JSON": (lambda r: f"/api/feature/{r.randrange(n)}", n_req),
            "index (ORDER BY max)": (
                lambda r: f"/?order=max&desc=true&page={r.randint(1, 2000)}",
                n_req // 4,
            ),
            "explanation search": (
                lambda r: f"/?q={r.choice(WORDS).split()[0]}%20{r.randrange(1000)}",
                n_req // 4,
            ),
            "text search (live)": (lambda r: "/api/search?" + urlencode({"text": r.choice(texts)}), n_search),
        }
        # warm-up: parquet footers, vocab, torch kernels
        for make, _ in endpoints.values():
            for i in range(3):
                httpx.get(base + make(random.Random(1000 + i)), timeout=120)
        results = {}
        for clients in args.clients:
            for name, (make, count) in endpoints.items():
                results[f"{name} x{clients}"] = load(base, make, count, clients)
                results[f"{name} x{clients}"]["server_rss_mb_after"] = round(rss_mb(proc.pid))
                print(f"{name:24s} clients={clients}: {results[f'{name} x{clients}']}", flush=True)
        rss1 = rss_mb(proc.pid)
        if args.map:
            t = time.perf_counter()
            httpx.get(base + "/api/map", timeout=600)
            first = time.perf_counter() - t
            results["map x1"] = load(base, lambda r: "/api/map", 20, 1)
            results["map x1"]["first_ms"] = round(1000 * first, 1)
        proc.terminate()
        proc.join(10)
        print(
            json.dumps(
                {
                    "machine": sys_info,
                    "features": args.features,
                    "rows": rows,
                    "db_size_mb": round(size_mb, 1),
                    "db_write_s": round(build_s, 1),
                    "server_rss_mb": {"before load": round(rss0), "after load": round(rss1)},
                    "results": results,
                },
                indent=2,
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
