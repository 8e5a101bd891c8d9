#!/usr/bin/env python3
"""Hearth's benchmarks: load, export, download, status-poll latency, with a baseline measured in
the same run. Results are medians of --runs runs; paste the printed table into BENCHMARKS.md.

    python3 bench/run.py load   --data /tmp/bench DIR...        # hearth load rate and peak RSS
    python3 bench/run.py export --data /tmp/bench [--runs 3]    # kick-off → manifest, downloads, RSS, poll latency
    python3 bench/run.py read   --data /tmp/bench               # GET [base]/Observation/<id> under wrk
    python3 bench/run.py client --data /tmp/bench [--parallel 4] # hearth export downloading a whole export: MB/s, peak RSS
    python3 bench/run.py poll   --data /tmp/bench --variant '' --variant '--export-priority low'  # status p99 A/B
    python3 bench/run.py levels --data /tmp/bench [--runs 3]    # Patient/Group export and _typeFilter vs system
    python3 bench/run.py groups --data /tmp/s300k /tmp/s2m      # Group export time by group size and store size
    python3 bench/run.py pg --database URL --data /tmp/pgb [--s3]  # PostgreSQL: export vs a bare COPY, one vs two instances
    python3 bench/run.py pgload --server URL DIR...               # hearth load --database vs psql COPY of the same lines
    python3 bench/run.py grow --data /tmp/g --base S1M --add S2M  # load into a store that already holds a set vs into an empty one

Needs a release build (cargo build --release -p hearth) and, for poll latency, wrk.
"""
import argparse, gzip, json, os, shutil, socket, statistics, subprocess, sys, tempfile, threading, time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTH = os.path.join(ROOT, "target", "release", "hearth")


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close(); return port


def request(url, method="GET", headers=None):
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def peak_rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class Server:
    def __init__(self, data, extra=(), hearth=HEARTH, env=None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        self.log = open(os.path.join(data, "bench-server.log"), "w")
        self.proc = subprocess.Popen([hearth, "serve", "--data", data, "--addr", f"127.0.0.1:{self.port}", *extra],
                                     stdout=self.log, stderr=self.log, env={**os.environ, "RUST_LOG": "warn", **(env or {})})
        for _ in range(400):
            try:
                if request(self.base + "/metadata")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.025)
        raise RuntimeError("server did not start")

    def stop(self):
        self.proc.terminate(); self.proc.wait(timeout=60); self.log.close()


def export_once(server, poll=0.05, params=""):
    started = time.perf_counter()
    status, headers, _ = request(server.base + "/$export" + params,
                                 headers={"Accept": "application/fhir+json", "Prefer": "respond-async"})
    assert status == 202, status
    location = headers["content-location"]
    while True:
        status, headers, body = request(location)
        if status == 200:
            return time.perf_counter() - started, json.loads(body), location
        assert status == 202, (status, body)
        time.sleep(poll)


def download_all(manifest, gzip_encoding, parallel=2):
    urls = [item["url"] for item in manifest["output"]]
    total = [0]
    lock = threading.Lock()

    def worker(chunk):
        for url in chunk:
            headers = {"Accept-Encoding": "gzip"} if gzip_encoding else {}
            req = urllib.request.Request(url, headers=headers)
            n = 0
            with urllib.request.urlopen(req, timeout=600) as r:
                if gzip_encoding:
                    with gzip.GzipFile(fileobj=r) as g:
                        while True:
                            b = g.read(1 << 20)
                            if not b: break
                            n += len(b)
                else:
                    while True:
                        b = r.read(1 << 20)
                        if not b: break
                        n += len(b)
            with lock:
                total[0] += n

    chunks = [urls[i::parallel] for i in range(parallel)]
    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in chunks]
    for t in threads: t.start()
    for t in threads: t.join()
    return time.perf_counter() - started, total[0]


def cat_baseline(manifest, data):
    """cat of the same NDJSON bytes to the same disk (files exported just before: page cache warm)."""
    job = manifest_job_dir(data, manifest)
    files = sorted(os.path.join(job, f) for f in os.listdir(job))
    out = os.path.join(data, "cat-baseline.ndjson")
    started = time.perf_counter()
    subprocess.run(f"cat {' '.join(files)} > {out}", shell=True, check=True)
    elapsed = time.perf_counter() - started
    size = os.path.getsize(out)
    os.remove(out)
    return elapsed, size


def manifest_job_dir(data, manifest):
    exports = os.path.join(data, "exports")
    newest = max((os.path.join(exports, d) for d in os.listdir(exports)), key=os.path.getmtime)
    return newest


def cmd_load(args):
    results = []
    for run in range(args.runs):
        shutil.rmtree(args.data, ignore_errors=True)
        started = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", HEARTH, "load", *args.paths, "--data", args.data],
                              capture_output=True, text=True, check=True)
        elapsed = time.perf_counter() - started
        rss = next(int(l.split()[-1]) for l in proc.stderr.splitlines() if "Maximum resident" in l)
        loaded = next(l for l in proc.stdout.splitlines() if l.startswith("loaded"))
        count = int(loaded.split()[1])
        results.append((elapsed, count / elapsed, rss))
        print(f"run {run + 1}: {count} resources in {elapsed:.2f} s = {count / elapsed:,.0f}/s, peak RSS {rss / 1024:.0f} MiB")
    print(f"median: {statistics.median(r[1] for r in results):,.0f} resources/s, peak RSS {max(r[2] for r in results) / 1024:.0f} MiB")


def cmd_export(args):
    server = Server(args.data, extra=["--export-workers", str(args.workers)])
    try:
        # A first export warms the page cache and leaves the files the cat baseline copies.
        _, manifest, location = export_once(server)
        rows = []
        for run in range(args.runs):
            subprocess.run(["sync"], check=True)
            cat_s, size = cat_baseline(manifest, args.data)
            request(location, method="DELETE")
            subprocess.run(["sync"], check=True)
            elapsed, manifest, location = export_once(server)
            resources = sum(item["count"] for item in manifest["output"])
            dl_s, dl_bytes = download_all(manifest, gzip_encoding=False)
            gz_s, gz_bytes = download_all(manifest, gzip_encoding=True)
            rows.append(dict(export_s=elapsed, rate=resources / elapsed, cat_s=cat_s, ratio=elapsed / cat_s,
                             dl=dl_bytes / dl_s / 1e6, gz=gz_bytes / gz_s / 1e6))
            print(f"run {run + 1}: {resources:,} resources, {size / 1e6:,.0f} MB: export {elapsed:.3f} s "
                  f"({resources / elapsed:,.0f}/s), cat {cat_s:.3f} s (x{elapsed / cat_s:.2f}); "
                  f"download {dl_bytes / dl_s / 1e6:,.0f} MB/s, gzip {gz_bytes / gz_s / 1e6:,.0f} MB/s (uncompressed)")
        request(location, method="DELETE")
        med = lambda k: statistics.median(r[k] for r in rows)
        print(f"median: export {med('export_s'):.3f} s = {med('rate'):,.0f} resources/s; cat {med('cat_s'):.3f} s; "
              f"ratio x{med('ratio'):.2f}; download {med('dl'):,.0f} MB/s; gzip {med('gz'):,.0f} MB/s")
        if shutil.which("wrk"):
            poll_latency(server)
        print(f"server peak RSS: {peak_rss_kb(server.proc.pid) / 1024:.0f} MiB")
    finally:
        server.stop()


def poll_latency(server, exporting=True):
    """wrk on $export-poll-status while exports run back to back in the same period (or, as
    a reference, while no export runs). Returns p99 in ms."""
    status, headers, _ = request(server.base + "/$export",
                                 headers={"Accept": "application/fhir+json", "Prefer": "respond-async"})
    location = headers["content-location"]
    request(location)  # the first poll
    while not exporting and request(location)[0] == 202:
        time.sleep(0.05)
    # Earlier exports' dirty pages are written back first, not during the measurement.
    subprocess.run(["sync"], check=True)
    stop = threading.Event()
    exports = [0]

    def keep_exporting():
        while not stop.is_set():
            _, _, loc = export_once(server, poll=0.05)
            request(loc, method="DELETE")
            exports[0] += 1

    background = threading.Thread(target=keep_exporting)
    if exporting:
        background.start()
        time.sleep(0.2)
    out = subprocess.run(["wrk", "-t1", "-c32", "-d10s", "--latency", location], capture_output=True, text=True)
    stop.set()
    if exporting:
        background.join()
    lines = [l for l in out.stdout.splitlines() if any(k in l for k in ("50%", "90%", "99%", "Requests/sec", "Non-2xx"))]
    print(f"poll latency under wrk (1 thread, 32 connections, 10 s) while {exports[0]} exports ran back to back:")
    for l in lines:
        print("   " + l.strip())
    request(location, method="DELETE")
    p99 = next(l.split()[-1] for l in lines if "99%" in l)
    for unit, ms in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if p99.endswith(unit):
            return float(p99[: -len(unit)]) * ms
    raise ValueError(f"wrk latency {p99!r}")


def cmd_poll(args):
    """Status poll p99 under wrk while exports run, for server variants (extra `serve`
    arguments) taken in turn, round after round, so that machine noise hits each alike; and, as
    a reference, the same wrk run while no export runs."""
    results = {variant: [] for variant in args.variant}
    idle_server = []
    for round_no in range(args.rounds):
        server = Server(args.data)
        try:
            print(f"round {round_no + 1}, reference: serve (defaults), no export running:")
            idle_server.append(poll_latency(server, exporting=False))
        finally:
            server.stop()
        for variant in args.variant:
            # NAME=value words set the server's environment (TOKIO_WORKER_THREADS=1, say).
            words = variant.split()
            env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
            server = Server(args.data, extra=[w for w in words if w.split("=", 1)[0] not in env], env=env)
            try:
                _, _, location = export_once(server)  # warms the page cache
                request(location, method="DELETE")
                print(f"round {round_no + 1}, serve {variant or '(defaults)'}:")
                results[variant].append(poll_latency(server))
            finally:
                server.stop()
    print(f"no export running: p99 {', '.join(f'{p:.2f}' for p in idle_server)} ms; median {statistics.median(idle_server):.2f} ms")
    for variant, p99s in results.items():
        print(f"serve {variant or '(defaults)'}: p99 {', '.join(f'{p:.2f}' for p in p99s)} ms; "
              f"median {statistics.median(p99s):.2f} ms")


def cmd_read(args):
    """GET [base]/{type}/{id} under wrk: the REST read path."""
    server = Server(args.data)
    try:
        _, _, body = request(server.base + "/Observation?_count=1")
        entry = json.loads(body)["entry"][0]["resource"]
        url = f"{server.base}/Observation/{entry['id']}"
        out = subprocess.run(["wrk", "-t1", "-c32", "-d10s", "--latency", url], capture_output=True, text=True)
        print(f"GET {url} under wrk (1 thread, 32 connections, 10 s):")
        for l in out.stdout.splitlines():
            if any(k in l for k in ("50%", "90%", "99%", "Requests/sec", "Non-2xx")):
                print("   " + l.strip())
    finally:
        server.stop()


def timed_export(server, path, runs, kept=None):
    """Median seconds from kick-off of `path` to its manifest (polled every 50 ms), the resources
    it listed, and the last manifest. Jobs are cancelled after, unless `kept` collects them."""
    times, counts = [], []
    for _ in range(runs):
        started = time.perf_counter()
        status, headers, body = request(server.base + path,
                                        headers={"Accept": "application/fhir+json", "Prefer": "respond-async"})
        assert status == 202, (status, body)
        location = headers["content-location"]
        while True:
            status, _, body = request(location)
            if status == 200:
                break
            assert status == 202, (status, body)
            time.sleep(0.05)
        times.append(time.perf_counter() - started)
        manifest = json.loads(body)
        counts.append(sum(item["count"] for item in manifest["output"]))
        if kept is not None:
            kept.append(location)
        else:
            request(location, method="DELETE")
    return statistics.median(times), counts[0], manifest


def cmd_groups(args):
    """Group export time against the group's size and the store's: synthetic groups of 10, 100
    and 1,000 members in each store given."""
    print("| store | " + " | ".join(args.groups) + " |")
    print("|---" * (len(args.groups) + 1) + "|")
    for data in args.data:
        server = Server(data, extra=["--export-workers", str(args.workers)])
        try:
            cells = []
            for group in args.groups:
                seconds, count, _ = timed_export(server, f"/Group/{group}/$export", args.runs)
                cells.append(f"{count:,} resources in {seconds:.3f} s")
            print(f"| {os.path.basename(os.path.normpath(data))} | " + " | ".join(cells) + " |")
        finally:
            server.stop()


def cmd_levels(args):
    """Patient/Group export and _typeFilter against the system export, measured in one run."""
    server = Server(args.data, extra=["--export-workers", str(args.workers)])
    try:
        kept = []

        def timed(params, path="/$export", keep=False):
            return timed_export(server, path + params, args.runs, kept if keep else None)

        system_s, system_n, _ = timed("")
        print(f"system export: {system_n:,} resources in {system_s:.3f} s = {system_n / system_s:,.0f}/s")
        patient_s, patient_n, _ = timed("", "/Patient/$export")
        print(f"Patient/$export: {patient_n:,} resources in {patient_s:.3f} s = {patient_n / patient_s:,.0f}/s "
              f"({patient_n / patient_s / (system_n / system_s):.0%} of the system rate)")
        status, _, _ = request(server.base + "/Group/group-1000")
        if status == 200:
            group_s, group_n, _ = timed("", "/Group/group-1000/$export")
            print(f"Group/group-1000/$export: {group_n:,} resources in {group_s:.3f} s = {group_n / group_s:,.0f}/s")
        obs_s, obs_n, manifest = timed("?_type=Observation", keep=True)
        # The most common code that selects at most ~5 % of Observations.
        codes = {}
        for item in manifest["output"][:1]:
            with urllib.request.urlopen(item["url"]) as r:
                for i, line in enumerate(r):
                    if i >= 50000:
                        break
                    coding = json.loads(line)["code"]["coding"][0]
                    key = coding["system"] + "|" + coding["code"]
                    codes[key] = codes.get(key, 0) + 1
        total = sum(codes.values())
        code = max((c for c in codes if codes[c] <= 0.05 * total), key=lambda c: codes[c])
        query = urllib.parse.quote(f"Observation?code={code}", safe="")
        for location in kept:
            request(location, method="DELETE")
        filtered_s, filtered_n, _ = timed(f"?_type=Observation&_typeFilter={query}")
        print(f"_type=Observation: {obs_n:,} in {obs_s:.3f} s = {obs_n / obs_s:,.0f}/s; "
              f"_typeFilter code={code}: {filtered_n:,} selected ({filtered_n / obs_n:.1%}) in {filtered_s:.3f} s = "
              f"{obs_n / filtered_s:,.0f} Observations scanned/s ({obs_s / filtered_s:.0%} of the unfiltered rate)")
    finally:
        server.stop()


def curl_all(manifest, out, parallel):
    """curl --compressed (gzip, decoded by curl) of every output file, `parallel` at a time."""
    urls = [item["url"] for item in manifest["output"]]
    chunks = [list(enumerate(urls))[i::parallel] for i in range(parallel)]

    def worker(chunk):
        for i, url in chunk:
            subprocess.run(["curl", "-sf", "--compressed", "-o", os.path.join(out, f"{i}.ndjson"), url], check=True)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in chunks]
    for t in threads: t.start()
    for t in threads: t.join()
    elapsed = time.perf_counter() - started
    return elapsed, sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))


def cmd_client(args):
    """`hearth export` (the bulk data client) downloading a whole export from a local Hearth:
    download rate (uncompressed bytes saved per second, files asked for as gzip) and the client's
    peak RSS. Baseline in the same run: curl --compressed of the same kind of export, as many
    files at a time."""
    server = Server(args.data, extra=["--export-workers", str(args.workers)], hearth=args.server_hearth or HEARTH)
    try:
        rows, peak_rss = [], 0
        # Run 0 is a warm-up, as in `export`: the first 3 GB written evict other data from the
        # page cache, which later runs (and a client in steady use) do not pay for.
        for run in range(args.runs + 1):
            _, manifest, location = export_once(server)
            out = tempfile.mkdtemp(prefix="hearth-client-bench-", dir=args.out)
            curl_s, curl_bytes = curl_all(manifest, out, args.parallel)
            request(location, method="DELETE")
            shutil.rmtree(out)
            subprocess.run(["sync"], check=True)
            out = tempfile.mkdtemp(prefix="hearth-client-bench-", dir=args.out)
            started = time.perf_counter()
            proc = subprocess.run(["/usr/bin/time", "-v", HEARTH, "export", server.base, "--out", out,
                                   "--parallel", str(args.parallel), "--json"], capture_output=True, text=True)
            elapsed = time.perf_counter() - started
            shutil.rmtree(out)
            subprocess.run(["sync"], check=True)
            if proc.returncode != 0:
                raise RuntimeError(f"hearth export failed: {proc.stderr[-2000:]}")
            summary = json.loads(proc.stdout)
            rss = next(int(l.split()[-1]) for l in proc.stderr.splitlines() if "Maximum resident" in l)
            cpu = next(l.split()[-1] for l in proc.stderr.splitlines() if "Percent of CPU" in l)
            rate = summary["bytes"] / summary["downloadSeconds"] / 1e6
            curl_rate = curl_bytes / curl_s / 1e6
            peak_rss = max(peak_rss, rss)
            if run > 0:
                rows.append(dict(rate=rate, curl=curl_rate))
            print(f"{'run ' + str(run) if run else 'warm-up'}: {summary['resources']:,} resources, {summary['bytes'] / 1e6:,.0f} MB in "
                  f"{len(summary['files'])} files ({summary['wireBytes'] / 1e6:,.0f} MB gzip on the wire): download "
                  f"{summary['downloadSeconds']:.2f} s = {rate:,.0f} MB/s, end to end {elapsed:.2f} s; "
                  f"client peak RSS {rss / 1024:.0f} MiB, CPU {cpu}; curl --compressed x{args.parallel} {curl_rate:,.0f} MB/s")
        med = lambda k: statistics.median(r[k] for r in rows)
        print(f"median: hearth export --parallel {args.parallel} {med('rate'):,.0f} MB/s "
              f"(curl x{args.parallel}: {med('curl'):,.0f} MB/s); client peak RSS max {peak_rss / 1024:.0f} MiB (warm-up included)")
    finally:
        server.stop()


def bare_copy(database, readers):
    """The stored bodies of current resources streamed to a file by psql COPY, split by seq range
    over `readers` parallel connections: the floor for an export from this database."""
    out = tempfile.mkdtemp(prefix="hearth-pg-baseline-")
    bounds = subprocess.run(["psql", database, "-Atc", "SELECT min(seq), max(seq) FROM resource_version"],
                            capture_output=True, text=True, check=True).stdout.strip().split("|")
    low, high = int(bounds[0]), int(bounds[1])
    step = (high - low) // readers + 1
    started = time.perf_counter()
    procs = []
    for n in range(readers):
        sql = (f"COPY (SELECT convert_from(body, 'UTF8') FROM resource_version WHERE NOT deleted AND superseded_by IS NULL "
               f"AND seq >= {low + n * step} AND seq < {low + (n + 1) * step} ORDER BY res_type, seq) TO STDOUT")
        procs.append(subprocess.Popen(f"psql '{database}' -c \"{sql}\" > {out}/part{n}", shell=True))
    for p in procs:
        assert p.wait() == 0
    elapsed = time.perf_counter() - started
    shutil.rmtree(out)
    return elapsed


class Moto:
    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                request(f"http://127.0.0.1:{self.port}/bench", method="PUT")
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("moto_server did not start")

    def flags(self):
        return ["--output", "s3://bench/exports", "--s3-endpoint", f"http://127.0.0.1:{self.port}", "--s3-allow-http"]

    def stop(self):
        self.proc.terminate(); self.proc.wait(timeout=30)


def cmd_pg(args):
    """System export from PostgreSQL (local output, and S3 through moto with --s3), against psql
    COPY of the same bodies with as many readers as workers, then one vs two instances."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench"); os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_REGION", "us-east-1")
    moto = Moto() if args.s3 else None
    os.makedirs(args.data, exist_ok=True)
    common = ["--database", args.database, "--export-workers", str(args.workers)] + (moto.flags() if moto else [])
    second_data = args.data + "-second"
    os.makedirs(second_data, exist_ok=True)
    try:
        server = Server(args.data, extra=common)
        try:
            _, manifest, location = export_once(server)  # warm-up
            request(location, method="DELETE")
            rows = []
            for run in range(args.runs):
                base_s = bare_copy(args.database, args.workers)
                elapsed, manifest, location = export_once(server)
                resources = sum(item["count"] for item in manifest["output"])
                request(location, method="DELETE")
                rows.append(dict(rate=resources / elapsed, base=resources / base_s, ratio=elapsed / base_s))
                print(f"run {run + 1}: {resources:,} resources: export {elapsed:.2f} s = {resources / elapsed:,.0f}/s; "
                      f"psql COPY x{args.workers} {base_s:.2f} s = {resources / base_s:,.0f}/s (x{elapsed / base_s:.2f})")
            med = lambda k: statistics.median(r[k] for r in rows)
            print(f"median, one instance{' (S3 output)' if moto else ''}: {med('rate'):,.0f} resources/s; "
                  f"bare COPY {med('base'):,.0f}/s; ratio x{med('ratio'):.2f}")
            if args.two:
                second = Server(second_data, extra=common)
                try:
                    pair = []
                    for run in range(args.runs):
                        elapsed, manifest, location = export_once(server)
                        resources = sum(item["count"] for item in manifest["output"])
                        request(location, method="DELETE")
                        pair.append(resources / elapsed)
                        print(f"two instances, run {run + 1}: {elapsed:.2f} s = {resources / elapsed:,.0f}/s")
                    print(f"median, two instances on this machine: {statistics.median(pair):,.0f} resources/s "
                          f"(x{statistics.median(pair) / med('rate'):.2f} of one)")
                finally:
                    second.stop()
        finally:
            server.stop()
    finally:
        if moto:
            moto.stop()


def timed_load(paths, data):
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", HEARTH, "load", *paths, "--data", data],
                          capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - started
    rss = next(int(l.split()[-1]) for l in proc.stderr.splitlines() if "Maximum resident" in l)
    count = int(next(l for l in proc.stdout.splitlines() if l.startswith("loaded")).split()[1])
    return count, elapsed, rss


def cmd_grow(args):
    """The rate of loading --add into a store already holding --base, against loading --add into
    an empty store in the same run: does the loader keep its speed as the store grows?"""
    rows = []
    for run in range(args.runs):
        shutil.rmtree(args.data, ignore_errors=True)
        count, empty_s, empty_rss = timed_load([args.add], args.data)
        shutil.rmtree(args.data, ignore_errors=True)
        base_count, _, _ = timed_load([args.base], args.data)
        _, grown_s, grown_rss = timed_load([args.add], args.data)
        rows.append(dict(empty=count / empty_s, grown=count / grown_s, ratio=empty_s / grown_s,
                         rss=max(empty_rss, grown_rss)))
        print(f"run {run + 1}: {count:,} into an empty store {count / empty_s:,.0f}/s; into a store of {base_count:,} "
              f"{count / grown_s:,.0f}/s (x{empty_s / grown_s:.2f}); peak RSS {max(empty_rss, grown_rss) / 1024:.0f} MiB")
    shutil.rmtree(args.data, ignore_errors=True)
    med = lambda k: statistics.median(r[k] for r in rows)
    print(f"median: empty {med('empty'):,.0f}/s, grown {med('grown'):,.0f}/s, ratio x{med('ratio'):.2f}; "
          f"peak RSS max {max(r['rss'] for r in rows) / 1024:.0f} MiB")


def cmd_pgload(args):
    """hearth load --database into a fresh database (rate, peak RSS), against psql COPY of the
    same NDJSON lines into an unindexed table in the same run: the floor of getting the bytes in."""
    admin = args.server.rstrip("/") + "/postgres"
    target = args.server.rstrip("/") + "/hearth_bench_load"
    files = [os.path.join(d, f) for d in args.paths for f in sorted(os.listdir(d)) if f.endswith(".ndjson")]
    fresh = lambda: subprocess.run(["psql", admin, "-qc", "DROP DATABASE IF EXISTS hearth_bench_load",
                                    "-c", "CREATE DATABASE hearth_bench_load"], check=True, capture_output=True)
    rows = []
    for run in range(args.runs):
        fresh()
        subprocess.run(["psql", target, "-qc", "CREATE TABLE raw (line TEXT)"], check=True)
        started = time.perf_counter()
        # CSV with quote and delimiter bytes that JSON never holds: each line arrives unchanged.
        subprocess.run(f"cat {' '.join(files)} | psql '{target}' -qc \"COPY raw FROM STDIN (FORMAT csv, QUOTE e'\\x01', DELIMITER e'\\x02')\"",
                       shell=True, check=True)
        copy_s = time.perf_counter() - started
        fresh()
        started = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", HEARTH, "load", *args.paths, "--database", target],
                              capture_output=True, text=True, check=True)
        elapsed = time.perf_counter() - started
        rss = next(int(l.split()[-1]) for l in proc.stderr.splitlines() if "Maximum resident" in l)
        count = int(next(l for l in proc.stdout.splitlines() if l.startswith("loaded")).split()[1])
        rows.append(dict(rate=count / elapsed, copy=count / copy_s, ratio=elapsed / copy_s, rss=rss))
        print(f"run {run + 1}: {count:,} resources in {elapsed:.1f} s = {count / elapsed:,.0f}/s (VACUUM included), "
              f"peak RSS {rss / 1024:.0f} MiB; psql COPY of the lines {copy_s:.1f} s = {count / copy_s:,.0f}/s (x{elapsed / copy_s:.2f})")
    fresh()
    med = lambda k: statistics.median(r[k] for r in rows)
    print(f"median: {med('rate'):,.0f} resources/s; psql COPY {med('copy'):,.0f}/s; ratio x{med('ratio'):.2f}; "
          f"peak RSS max {max(r['rss'] for r in rows) / 1024:.0f} MiB")


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    load = sub.add_parser("load"); load.add_argument("paths", nargs="+"); load.add_argument("--data", required=True)
    load.add_argument("--runs", type=int, default=3)
    export = sub.add_parser("export"); export.add_argument("--data", required=True)
    export.add_argument("--runs", type=int, default=3); export.add_argument("--workers", type=int, default=os.cpu_count())
    read = sub.add_parser("read"); read.add_argument("--data", required=True)
    levels = sub.add_parser("levels"); levels.add_argument("--data", required=True)
    levels.add_argument("--runs", type=int, default=3); levels.add_argument("--workers", type=int, default=os.cpu_count())
    client = sub.add_parser("client"); client.add_argument("--data", required=True)
    client.add_argument("--runs", type=int, default=3); client.add_argument("--parallel", type=int, default=4)
    client.add_argument("--workers", type=int, default=os.cpu_count())
    client.add_argument("--out", default=tempfile.gettempdir(), help="where the downloads go (removed after each run)")
    client.add_argument("--server-hearth", help="another hearth binary for the server (default: the same)")
    pg = sub.add_parser("pg"); pg.add_argument("--database", required=True); pg.add_argument("--data", required=True)
    pg.add_argument("--runs", type=int, default=3); pg.add_argument("--workers", type=int, default=os.cpu_count())
    pg.add_argument("--s3", action="store_true", help="export to a moto S3 bucket instead of local files")
    pg.add_argument("--two", action="store_true", help="also run a second instance on the same database")
    grow = sub.add_parser("grow"); grow.add_argument("--data", required=True); grow.add_argument("--base", required=True)
    grow.add_argument("--add", required=True); grow.add_argument("--runs", type=int, default=3)
    groups = sub.add_parser("groups"); groups.add_argument("--data", required=True, nargs="+")
    groups.add_argument("--groups", nargs="+", default=["group-10", "group-100", "group-1000"])
    groups.add_argument("--runs", type=int, default=3); groups.add_argument("--workers", type=int, default=os.cpu_count())
    poll = sub.add_parser("poll"); poll.add_argument("--data", required=True)
    poll.add_argument("--rounds", type=int, default=3)
    poll.add_argument("--variant", action="append", help="extra serve arguments and NAME=value environment, e.g. '--export-priority low' (repeat; '' for the defaults)")
    pgload = sub.add_parser("pgload"); pgload.add_argument("paths", nargs="+")
    pgload.add_argument("--server", default="postgres://postgres@127.0.0.1:5432", help="server URL without database")
    pgload.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    {"load": cmd_load, "export": cmd_export, "read": cmd_read, "levels": cmd_levels, "client": cmd_client, "pg": cmd_pg, "pgload": cmd_pgload, "grow": cmd_grow, "groups": cmd_groups, "poll": cmd_poll}[args.cmd](args)


if __name__ == "__main__":
    main()
