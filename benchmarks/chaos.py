"""Chaos: random sequences of the scheduled job's operations on one collection, two at a time
where they can overlap, processes killed (SIGKILL) at random moments and at the named points
of runtime/failpoints.py; after every step, the invariants of the transaction model.

    python -m benchmarks.chaos --store local --steps 200 --seed 0
    python -m benchmarks.chaos --store s3 --steps 100 --seed 1          # a moto S3 server on loopback
    python -m benchmarks.chaos --store gcs --steps 50 --seed 2          # the GCS emulator: one writer at a time

Operations: the collection changes (a new image, one rewritten with other bytes, one
deleted, identical bytes uploaded again), `update`, `extract`, `build --append`, `remove
--index`, `restore`, `compact`, and `query` (a reader). Each runs in one of two worker
processes that import delf-index once and run `delf-index` commands sent to them, so that a
kill is a real SIGKILL of a job. The GCS emulator ignores preconditions, so on gs:// only
one writer runs at a time (the features table stays on local disk: delta-rs cannot talk to
the emulator). Invariants, after every step:

- each image live at most once in the table, and every data file of its snapshot readable;
- the index loads whole (checksums verified), and holds exactly the live, not-taken-down
  images of the table version its manifest names, as the same (image_id, run) records;
- the index's log sequence and table version never go back;
- nothing taken down comes back: the taken-down set only grows by removals and shrinks by
  restorations, and a taken-down image is live nowhere;
- no job exits 0 having lost its work: a removal or restoration that exited 0 is in the
  table; an update that exited 0 alone left the table and the index holding every listed
  image, and an append that exited 0 left the index at the table version it started from,
  or later;
- a reader (query) started while an index existed exits 0, whatever writers do meanwhile.

Prints one JSON line per step and a summary (steps, operations, kills, checks).
"""

import argparse
import contextlib
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np

WRITERS = ("update", "extract", "append", "remove", "restore", "compact")
CRASH_POINTS = {
    "update": ("extract:planned", "extract:written", "extract:committed", "build:placed", "build:published"),
    "extract": ("extract:planned", "extract:written", "extract:committed"),
    "append": ("build:placed", "build:published"),
    "remove": ("remove:written", "build:placed", "build:published"),
    "restore": ("remove:written",),
    "compact": ("compact:written",),
}
OPERATIONS = {  # weights of the random choice
    "mutate": 3,
    "update": 4,
    "extract": 1,
    "append": 1,
    "remove": 1,
    "restore": 1,
    "compact": 1,
    "query": 2,
}


# -- the worker processes -------------------------------------------------------------------------
def serve():
    """A worker: runs `delf-index` commands read as JSON lines from stdin, one at a time, and
    answers each with a line `@@chaos <token> <exit code>` (C libraries print on stdout too)."""
    from delf_index.pipelines import cli

    for line in sys.stdin:
        command = json.loads(line)
        saved = {k: os.environ.get(k) for k in command["env"]}
        os.environ.update(command["env"])
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                code = cli.main(command["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception as e:  # a bug: its traceback goes to stderr, the harness sees the code
            import traceback

            traceback.print_exc()
            print(f"chaos worker: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            code = 3
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        print(f"@@chaos {command['token']} {code}", flush=True)


class Worker:
    def __init__(self, log):
        self.log = log
        self.process = None

    def start(self):
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.chaos", "--serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.log,
            )
            os.set_blocking(self.process.stdout.fileno(), False)
            self.pending = b""

    def send(self, argv, env=None):
        self.start()
        self.token = uuid.uuid4().hex
        self.process.stdin.write((json.dumps({"argv": argv, "env": env or {}, "token": self.token}) + "\n").encode())
        self.process.stdin.flush()

    def poll(self):
        """The exit code of the running command, or None while it runs; -9 once killed. Reads
        the pipe's bytes itself: a buffered reader would hold lines select() no longer sees."""
        while True:
            try:
                chunk = os.read(self.process.stdout.fileno(), 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.pending += chunk
        marker = f"@@chaos {self.token} ".encode()
        for line in self.pending.split(b"\n")[:-1]:  # whole lines only
            if line.startswith(marker):
                self.pending = b""
                return int(line.split()[2])
        self.pending = self.pending[self.pending.rfind(b"\n") + 1 :]
        return -9 if self.process.poll() is not None else None

    def kill(self):
        self.process.kill()
        self.process.wait()

    def close(self):
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)


# -- the collection ------------------------------------------------------------------------------
def pictures(count, seed=0):
    """`count` distinct small JPEG images: crops, flips and tints of scikit-image's photos."""
    from PIL import Image
    from skimage import data

    photos = [np.asarray(getattr(data, n)())[..., :3] for n in ("astronaut", "coffee", "chelsea", "rocket")]
    out = []
    for n in range(count):
        rng = np.random.default_rng([seed, n])
        photo = photos[n % len(photos)]
        h, w = photo.shape[:2]
        y, x = rng.integers(0, h // 4), rng.integers(0, w // 4)
        image = photo[y : y + h * 3 // 4, x : x + w * 3 // 4]
        image = image[:, ::-1] if rng.random() < 0.5 else image
        image = np.clip(image * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
        small = Image.fromarray(np.ascontiguousarray(image))
        small.thumbnail((160, 160))
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


class World:
    """The collection (images in a folder or bucket), its features table and index, a model of
    what should be listed, and the invariants."""

    def __init__(self, images, features, index, codebooks, seed, pool=24):
        from delf_index.runtime import storage

        self.images, self.features, self.index = images.rstrip("/"), features.rstrip("/"), index.rstrip("/")
        self.codebooks = codebooks
        self.fs, self.images_path = storage.filesystem(self.images)
        self.fs.makedirs(self.images_path, exist_ok=True)
        self.rng = random.Random(seed)
        self.pool = pictures(pool, seed)
        self.listing = {}  # name -> picture number
        self.blocked, self.sequence, self.table_version = set(), 0, -1
        self.checks = 0
        for n in range(6):
            self.put(f"img{n:03d}.jpg", n)

    def put(self, name, picture):
        self.fs.pipe_file(f"{self.images_path}/{name}", self.pool[picture])
        self.listing[name] = picture

    def mutate(self, kind=None):
        kind = kind or self.rng.choice(["new", "rewrite", "delete", "same bytes"] if len(self.listing) > 3 else ["new"])
        if kind == "new":
            name = f"img{max(int(n[3:6]) for n in self.listing) + 1:03d}.jpg" if self.listing else "img000.jpg"
            self.put(name, self.rng.randrange(len(self.pool)))
        elif kind == "rewrite":
            name = self.rng.choice(sorted(self.listing))
            self.put(name, (self.listing[name] + 1 + self.rng.randrange(len(self.pool) - 1)) % len(self.pool))
        elif kind == "delete":
            name = self.rng.choice(sorted(self.listing))
            self.fs.rm_file(f"{self.images_path}/{name}")
            del self.listing[name]
        else:
            name = self.rng.choice(sorted(self.listing))
            self.put(name, self.listing[name])
        return f"{kind} {name}"

    def command(self, op):
        """The argv of an operation (None: nothing to do now)."""
        common = ["--workers", "1"]
        if op == "update":
            return ["update", "--input", self.images, "--features", self.features, "--index", self.index,
                    "--codebooks", self.codebooks, "--max-change", "1", *common]  # fmt: skip
        if op == "extract":
            return ["extract", "--input", self.images, "--output", self.features, "--max-change", "1", *common]
        if op == "append":
            return ["build", "--features", self.features, "--output", self.index, "--append", *common]
        if op == "remove":
            known = sorted(set(self.listing) - self.blocked)
            ids = self.rng.sample(known, min(len(known), self.rng.choice([1, 1, 2]))) if known else []
            return ["remove", "--features", self.features, "--ids", ",".join(ids), "--index", self.index,
                    "--max-change", "1"] if ids else None  # fmt: skip
        if op == "restore":
            ids = sorted(self.blocked)
            return ["restore", "--features", self.features, "--ids", self.rng.choice(ids)] if ids else None
        if op == "compact":
            return ["compact", "--features", self.features]
        if op == "query":
            return ["query", "--index", self.index, f"{self.images}/{self.rng.choice(sorted(self.listing))}"]
        raise ValueError(op)

    # -- the invariants -----------------------------------------------------------------------
    def state(self):
        """(table snapshot or None, resolved, live records) of the features table now."""
        from delf_index.runtime import tables

        if not tables.exists(self.features):
            return None, None, None
        snap = tables.snapshot(self.features)
        records = snap.read(["image_id", "status", "run"])
        resolved = tables.resolve(records)
        return snap, resolved, tables.live_records(records, resolved)

    def check(self, finished):
        """Check every invariant after a step; `finished`: [(operation, argv, exit code)]."""
        from delf_index.indexing import artifact as art
        from delf_index.runtime import tables

        snap, resolved, live = self.state()
        live_ids = live.column("image_id").to_pylist() if live is not None else []
        assert len(live_ids) == len(set(live_ids)), "an image is live twice"
        blocked = set(resolved.filter(resolved.column("blocked")).column("image_id").to_pylist()) if snap else set()
        if snap is not None:
            for uri in snap.files:  # every file the snapshot names is there and readable
                tables.read_columns(uri, ["image_id"])
        # takedowns: only removals add, only restorations take away, none is live
        removed = {i for op, argv, code in finished if op == "remove" for i in argv[argv.index("--ids") + 1].split(",")}
        restored = {argv[argv.index("--ids") + 1] for op, argv, code in finished if op == "restore"}
        assert blocked <= self.blocked | removed, f"taken down without a removal: {blocked - self.blocked - removed}"
        assert self.blocked - restored <= blocked, f"a takedown came back: {self.blocked - restored - blocked}"
        assert not blocked & set(live_ids), "a taken-down image is live"
        for op, argv, code in finished:
            ids = set(argv[argv.index("--ids") + 1].split(",")) if op in ("remove", "restore") else set()
            if op == "remove" and code == 0:
                assert ids <= blocked, f"remove exited 0 but {ids - blocked} are not taken down"
            if op == "restore" and code == 0:
                assert not ids & blocked, f"restore exited 0 but {ids & blocked} are still down"
        self.blocked = blocked
        # the index: whole, and exactly the live records of the table version it names
        entry, held = art.current_entry(self.index), None
        if entry is not None:
            artifact = art.Artifact.load(self.index)
            named = artifact.manifest["features"]["table_version"]
            assert entry["sequence"] >= self.sequence and named >= self.table_version, "the index went back"
            self.sequence, self.table_version = entry["sequence"], named
            at = tables.live_records(tables.snapshot(self.features, named).read(["image_id", "status", "run"]))
            expected = set(zip(at.column("image_id").to_pylist(), at.column("run").to_pylist()))
            held = {(i, artifact.runs[row] or "") for i, row in artifact.row_of.items()}
            assert held == expected, f"index {entry['version']} differs from table version {named}: {held ^ expected}"
        # no job exited 0 having lost its work
        writers = [(op, code) for op, _, code in finished if op in WRITERS]
        now = set(zip(live_ids, live.column("run").to_pylist())) if live is not None else set()
        if len(writers) == 1 and writers[0] == ("update", 0):
            listed = set(self.listing) - blocked
            assert set(live_ids) == listed, f"update exited 0; the table lacks {listed - set(live_ids)}"
        if len(writers) == 1 and writers[0][0] in ("update", "append", "remove") and writers[0][1] == 0:
            assert held == now, f"{writers[0][0]} exited 0 but the index is not the table's live images"
        self.checks += 1
        return {"live": len(live_ids), "blocked": len(blocked), "index_sequence": self.sequence,
                "table_version": None if snap is None else snap.version}  # fmt: skip


# -- a run -----------------------------------------------------------------------------------
def choose(world, rng, single_writer, kill_rate, cache_env):
    """A random step: a mutation of the collection (a string), or one or two operations to run
    at once, each (name, argv, env, kill: a failpoint, a time to kill at, or None)."""
    op = rng.choices(list(OPERATIONS), weights=list(OPERATIONS.values()))[0]
    if op == "mutate":
        return world.mutate()
    ops = [op]
    if rng.random() < 0.5:
        other = rng.choice([o for o in OPERATIONS if o != "mutate"])
        if not (single_writer and other in WRITERS and op in WRITERS):
            ops.append(other)
    chosen = []
    for name in ops:
        argv = world.command(name)
        if argv is None:
            continue
        if name in WRITERS and rng.random() < 0.5:
            argv = argv + ["--wait"]
        env, kill = dict(cache_env), None
        if name in WRITERS and rng.random() < kill_rate:
            if rng.random() < 0.5:
                env["DELF_INDEX_CRASH_AT"] = kill = rng.choice(CRASH_POINTS[name])
            else:
                kill = time.time() + rng.uniform(0.0, 6.0)
        chosen.append((name, argv, env, kill))
    return chosen


def execute(world, workers, chosen):
    """Run the chosen operations at once, killing them as chosen; (report, [(name, argv, exit
    code)]), the exit code -9 for a killed one."""
    index_existed = world.sequence > 0
    running = []
    for worker, (name, argv, env, kill) in zip(workers, chosen):
        worker.send(argv, env)
        running.append([worker, name, argv, kill, None])
    deadline = time.time() + 600
    while any(r[4] is None for r in running):
        for r in running:
            worker, _, _, kill, code = r
            if code is not None:
                continue
            r[4] = worker.poll()
            if r[4] is None and isinstance(kill, float) and time.time() > kill:
                worker.kill()
                r[4] = -9
        if time.time() > deadline:
            raise TimeoutError(f"operations {[r[1] for r in running]} ran past 600 s")
        time.sleep(0.05)
    finished = [(name, argv, code) for _, name, argv, _, code in running]
    for name, _, code in finished:
        if name == "query" and index_existed:
            assert code in (0, -9), f"a reader failed (exit {code}) while writers ran"
        assert code in (0, 1, -9), f"{name} exited {code}: a bug, not a refusal (see the workers' log)"
    report = {
        "ops": [(name, code) for name, _, code in finished],
        "kills": [r[3] for r in running if r[3] and r[4] == -9],
    }
    return report, finished


def codebooks_for(folder, seed=0):
    """Codebooks fitted once on the collection's pictures, so that a first update need not fit."""
    from delf_index.pipelines import extract, fit

    images, table, codebooks = (os.path.join(folder, n) for n in ("images", "table", "codebooks"))
    os.makedirs(images, exist_ok=True)
    for n, data in enumerate(pictures(24, seed)):
        with open(os.path.join(images, f"{n:03d}.jpg"), "wb") as f:
            f.write(data)
    with contextlib.redirect_stdout(io.StringIO()):
        extract.run(images, table, beam_options={"workers": 1})
        fit.run(table, codebooks, {"nlist": 16, "sample": 20000}, beam_options={"workers": 1})
    return codebooks


def run(images, features, index, codebooks, steps, seed, single_writer=False, kill_rate=0.3, log=None, cache=None):
    """`steps` random steps on a collection; returns the summary. Raises AssertionError at the
    first broken invariant."""
    rng = random.Random(seed)
    world = World(images, features, index, codebooks, seed)
    cache_env = {"DELF_INDEX_CACHE": cache or tempfile.mkdtemp(prefix="chaos-cache-")}
    log = log or open(os.devnull, "w")
    workers = [Worker(log), Worker(log)]
    summary = {"steps": 0, "operations": {}, "exits": {}, "kills": 0, "checks": 0}
    try:
        crash = {**cache_env, "DELF_INDEX_CRASH_AT": "extract:written"}
        for number in range(steps):
            # first an update that builds the index, then a new image and an update killed between
            # its files and its commit; random steps after
            if number == 0:
                chosen = [("update", world.command("update"), dict(cache_env), None)]
            elif number == 1:
                world.mutate("new")
                chosen = [("update", world.command("update"), crash, "extract:written")]
            else:
                chosen = choose(world, rng, single_writer, kill_rate, cache_env)
            if isinstance(chosen, str):
                report, finished = {"mutate": chosen}, []
            else:
                report, finished = execute(world, workers, chosen)
            report.update(world.check(finished), step=number)
            summary["steps"] += 1
            summary["kills"] += len(report.get("kills", []))
            for name, _, code in finished:
                summary["operations"][name] = summary["operations"].get(name, 0) + 1
                summary["exits"][str(code)] = summary["exits"].get(str(code), 0) + 1
            print(json.dumps(report), flush=True)
    finally:
        for worker in workers:
            with contextlib.suppress(Exception):
                worker.close()
    summary["checks"] = world.checks
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", choices=("local", "s3", "gcs"), default="local")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-rate", type=float, default=0.3, help="share of writers killed")
    parser.add_argument("--workdir", help="default: a temporary folder")
    args = parser.parse_args(argv)
    if args.serve:
        return serve()
    workdir = args.workdir or tempfile.mkdtemp(prefix="chaos-")
    os.makedirs(workdir, exist_ok=True)
    with servers(args.store) as root:
        root = root or workdir
        features = f"{root}/features" if args.store == "s3" else os.path.join(workdir, "features")
        start = time.time()
        codebooks = codebooks_for(os.path.join(workdir, "codebooks"), args.seed)
        with open(os.path.join(workdir, "workers.log"), "w") as log:
            summary = run(f"{root}/images", features, f"{root}/index", codebooks, args.steps, args.seed,
                          single_writer=args.store == "gcs", kill_rate=args.kill_rate, log=log,
                          cache=os.path.join(workdir, "cache"))  # fmt: skip
        summary.update(store=args.store, seed=args.seed, seconds=round(time.time() - start, 1))
        print(json.dumps(summary))


@contextlib.contextmanager
def servers(store):
    """A moto S3 server or the GCS emulator on loopback, as the test fixtures start them;
    yields the bucket URI (None for local disk)."""
    import socket

    if store == "local":
        yield None
        return
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    if store == "s3":
        import boto3
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}")  # fmt: skip
        boto3.client("s3").create_bucket(Bucket="chaos")
        yield "s3://chaos"
    else:
        from gcp_storage_emulator.server import create_server

        server = create_server("127.0.0.1", port, in_memory=True, default_bucket="chaos")
        server.start()
        os.environ.update(STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
        yield "gs://chaos"
    server.stop()


if __name__ == "__main__":
    main()
