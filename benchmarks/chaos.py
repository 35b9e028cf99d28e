"""Chaos: random sequences of the scheduled job's operations on one collection, two at a time
where they can overlap, processes killed (SIGKILL) at random moments and at the named points
of runtime/failpoints.py, operations given wrong input; after every step, the invariants of
the transaction model.

    python -m benchmarks.chaos --store local --steps 300 --seed 0
    python -m benchmarks.chaos --store s3 --steps 150 --seed 1          # a moto S3 server on loopback
    python -m benchmarks.chaos --store gcs --steps 50 --seed 2          # the GCS emulator: one writer at a time
    python -m benchmarks.chaos --steps 30 --seed 3 --break known-ids    # a fixed bug back: the run must fail

Operations: the collection changes (a new image, one rewritten with other bytes, one
deleted, identical bytes written again, the whole collection written again as a restore
from a backup does), `update`, `extract`, `build --append`, `remove --index`, `restore`,
`compact`, `query` (a reader), and operations given wrong input: an update with a mistyped
--features, a mistyped --index (remove, append, query), another table or a stale copy of
the table (append, update, remove), unknown image_ids (remove, restore), and a listing one
folder too high. Each runs in one of two worker processes that import delf-index once and
run `delf-index` commands sent to them, so that a kill is a real SIGKILL of a job. Writers
keep index versions for a short grace (0 to 3 s, sometimes one version), so that readers
meet prunes. The GCS emulator ignores preconditions, so on gs:// only one writer runs at a
time (the features table stays on local disk: delta-rs cannot talk to the emulator).

After the first steps (an update that builds the index, then one killed in its commit
window), a tour runs every operation kind once, alone and not killed, in a seeded order;
random steps follow. Invariants, after every step:

- each image live at most once in the table, and every data file of its snapshot readable;
- the index loads whole (checksums verified), names its own table (its id and URI), and
  holds exactly the live, not-taken-down images of the table version its manifest names,
  as the same (image_id, run) records; its log sequence and table version never go back;
- nothing taken down comes back: the taken-down set only grows by removals and shrinks by
  restorations, a taken-down image is live nowhere, and after a removal that exited 0 no
  data file in the table's folder holds a record of it but its removal;
- unchanged bytes stay unchanged: an image whose bytes were not rewritten keeps its live
  record (touched, copied back, written again with the same bytes); after an update or
  extract that ran alone and exited 0, a rewritten image's live record is a newer one, and
  every listed image not taken down is live;
- a query of a live image's own photo returns it first (when the index holds its current
  record);
- progress: a writer that ran alone and was not killed exits 0; a wrong-input operation
  exits 1 (refused) and changes nothing: the table, the index, the other tables, and no
  table or index appears at a mistyped path; a reader started while an index existed
  exits 0, whatever writers do meanwhile.

A run with `require_all` (the command line's) also asks that every operation kind succeeded
at least once and that versions were pruned. Prints one JSON line per step and a summary:
steps, operations and successes per kind, exit codes, kills, prunes, checks.

Figures: benchmarks/README.md, "Transactions (issue 29)".
"""

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np

WRITERS = ("update", "extract", "append", "remove", "restore", "compact")
WRONG = ("typo-table", "typo-index", "other-table", "unknown-ids", "wrong-listing")  # each must be refused
KINDS = (*WRITERS, "query", *WRONG)
CRASH_POINTS = {
    "update": ("extract:planned", "extract:written", "extract:committed", "build:placed", "build:published"),
    "extract": ("extract:planned", "extract:written", "extract:committed"),
    "append": ("build:placed", "build:published"),
    "remove": ("remove:written", "remove:committed", "build:placed", "build:published"),
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
    "wrong": 2,  # one of WRONG
}
MUTATIONS = ("new", "rewrite", "delete", "same bytes", "copied back")


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
def picture(n, seed=0):
    """Picture `n`: a small JPEG, a seeded crop, flip and tint of one of scikit-image's photos."""
    from PIL import Image
    from skimage import data

    photo = np.asarray(getattr(data, ("astronaut", "coffee", "chelsea", "rocket")[n % 4])())[..., :3]
    rng = np.random.default_rng([seed, n])
    h, w = photo.shape[:2]
    y, x = rng.integers(0, h // 4), rng.integers(0, w // 4)
    image = photo[y : y + h * 3 // 4, x : x + w * 3 // 4]
    image = image[:, ::-1] if rng.random() < 0.5 else image
    image = np.clip(image * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
    small = Image.fromarray(np.ascontiguousarray(image))
    small.thumbnail((160, 160))
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def pictures(count, seed=0):
    return [picture(n, seed) for n in range(count)]


class SystemUnderTest:
    """The collection (images in a folder or bucket), its features table and index, a model of
    what should be listed and served, and the invariants."""

    def __init__(self, images, features, index, codebooks, other, seed):
        from delf_index.runtime import storage

        self.images, self.features, self.index = images.rstrip("/"), features.rstrip("/"), index.rstrip("/")
        self.codebooks, self.other, self.stale = codebooks, other, f"{self.features}-stale"
        self.fs, self.images_path = storage.filesystem(self.images)
        self.fs.makedirs(self.images_path, exist_ok=True)
        self.rng, self.seed = random.Random(seed), seed
        self.listing, self.next_picture = {}, 0  # name -> picture number (each picture used once)
        self.rewritten = {}  # image rewritten with other bytes -> its live run then (None: none)
        self.live_runs, self.live_at = {}, {}  # image -> live run at the last check; table version -> live pairs
        self.blocked, self.sequence, self.table_version = set(), 0, -1
        self.versions, self.extractor = set(), None
        self.counts = {"checks": 0, "pruned": 0, "self_queries": 0, "unverifiable": 0}
        for n in range(6):
            self.put(f"img{n:03d}.jpg")

    def put(self, name, same=False):
        number = self.listing[name] if same else self.next_picture
        self.next_picture += not same
        self.fs.pipe_file(f"{self.images_path}/{name}", picture(number, self.seed))
        self.listing[name] = number

    def mutate(self, kind=None):
        kind = kind or self.rng.choice(MUTATIONS if len(self.listing) > 3 else ["new"])
        name = self.rng.choice(sorted(self.listing)) if self.listing else None
        if kind == "new":  # the name after the highest listed: a deleted one may come back with other bytes
            name = f"img{max(int(n[3:6]) for n in self.listing) + 1:03d}.jpg" if self.listing else "img000.jpg"
            self.put(name)
            self.rewritten.setdefault(name, self.live_runs.get(name))
        elif kind == "rewrite":
            self.put(name)
            self.rewritten.setdefault(name, self.live_runs.get(name))
        elif kind == "delete":
            self.fs.rm_file(f"{self.images_path}/{name}")
            del self.listing[name]
        elif kind == "same bytes":
            self.put(name, same=True)
        else:  # every file written again with its own bytes: new mtimes (local), new objects (S3)
            for each in sorted(self.listing):
                self.put(each, same=True)
            name = f"{len(self.listing)} images"
        return f"{kind} {name}"

    def command(self, op, known=()):
        """The argv of an operation (None: nothing to do now); `known`: the image_ids the table holds."""
        common = ["--workers", "1"]
        keep = ["--keep", "1"] if self.rng.random() < 0.3 else []
        if op == "update":
            return ["update", "--input", self.images, "--features", self.features, "--index", self.index,
                    "--codebooks", self.codebooks, "--max-change", "1", *keep, *common]  # fmt: skip
        if op == "extract":
            return ["extract", "--input", self.images, "--output", self.features, "--max-change", "1", *common]
        if op == "append":
            return ["build", "--features", self.features, "--output", self.index, "--append", *keep, *common]
        if op == "remove":
            held = sorted(set(self.listing) & set(known) - self.blocked)
            ids = self.rng.sample(held, min(len(held), self.rng.choice([1, 1, 2]))) if held else []
            ahead = sorted(set(self.listing) - set(known))  # listed, not extracted yet: allowed by name
            extra = [self.rng.choice(ahead), "--allow-unknown"] if ahead and self.rng.random() < 0.3 else []
            ids += extra[:1]
            return ["remove", "--features", self.features, "--ids", ",".join(ids), "--index", self.index,
                    "--max-change", "1", *extra[1:]] if ids else None  # fmt: skip
        if op == "restore":
            down = sorted(self.blocked & set(known))
            ids = self.rng.sample(down, min(len(down), self.rng.choice([1, 1, 2])))
            return ["restore", "--features", self.features, "--ids", ",".join(ids)] if ids else None
        if op == "compact":
            return ["compact", "--features", self.features]
        if op == "query":
            return ["query", "--index", self.index, f"{self.images}/{self.rng.choice(sorted(self.listing))}"]
        return self.wrong(op, known)

    def wrong(self, op, known):
        """The argv of a wrong-input operation: each must be refused, and change nothing."""
        some = self.rng.choice(sorted(known)) if known else "img000.jpg"
        if op == "typo-table":
            return ["update", "--input", self.images, "--features", f"{self.features}-typo", "--index", self.index,
                    "--codebooks", self.codebooks, "--max-change", "1", "--workers", "1"]  # fmt: skip
        if op == "typo-index":
            return self.rng.choice([
                ["remove", "--features", self.features, "--ids", some, "--index", f"{self.index}-typo",
                 "--max-change", "1"],
                ["build", "--features", self.features, "--output", f"{self.index}-typo", "--append", "--workers", "1"],
                ["query", "--index", f"{self.index}-typo", f"{self.images}/{self.rng.choice(sorted(self.listing))}"],
            ])  # fmt: skip
        if op == "other-table":
            # the stale copy only once the index names a newer version than it holds
            other = self.stale if self.table_version > self.stale_version and self.rng.random() < 0.5 else self.other
            return self.rng.choice([
                ["build", "--features", other, "--output", self.index, "--append", "--workers", "1"],
                ["update", "--input", self.images, "--features", other, "--index", self.index, "--codebooks",
                 self.codebooks, "--max-change", "1", "--workers", "1"],
                ["remove", "--features", other, "--ids", "000.jpg", "--index", self.index, "--max-change", "1"],
            ])  # fmt: skip
        if op == "unknown-ids":
            typo = some[:-5] + some[-4:]  # a character dropped: img003.jpg -> img00.jpg
            return self.rng.choice([
                ["remove", "--features", self.features, "--ids", typo, "--index", self.index, "--max-change", "1"],
                ["restore", "--features", self.features, "--ids", f"never-{typo}"],
            ])  # fmt: skip
        if op == "wrong-listing" and not self.live_runs:  # no live image: the guard has nothing to keep
            return self.wrong("unknown-ids", known)
        if op == "wrong-listing":  # one folder too high: every image_id changes, the guard refuses
            return ["update", "--input", self.images.rsplit("/", 1)[0], "--features", self.features, "--index",
                    self.index, "--codebooks", self.codebooks, "--workers", "1"]  # fmt: skip
        raise ValueError(op)

    def keep_stale_copy(self):
        """A copy of the table as it is now: later, an older version of the same table."""
        from delf_index.runtime import storage, tables

        fs, source = storage.filesystem(self.features)
        target = storage.filesystem(self.stale)[1]
        if storage.is_local(self.features):
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("_lease.json*"))
        else:
            fs.copy(source, target, recursive=True)
        self.stale_version = tables.snapshot(self.stale).version

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

    def known(self):
        snap, resolved, _ = self.state()
        return set(resolved.column("image_id").to_pylist()) if snap is not None else set()

    def outside(self):
        """What wrong input must never change: (table version, index log sequence, the other
        tables' versions, whether anything exists at the mistyped paths)."""
        from delf_index.indexing.versions import current_entry
        from delf_index.runtime import storage, tables

        entry = current_entry(self.index)
        typos = []
        for path in (self.features, self.index):
            fs, typo = storage.uncached_filesystem(f"{path}-typo")
            typos.append(fs.exists(typo))
        return (tables.snapshot(self.features).version if tables.exists(self.features) else None,
                entry and entry["sequence"], tables.snapshot(self.other).version,
                tables.snapshot(self.stale).version if tables.exists(self.stale) else None, typos)  # fmt: skip

    def check(self, finished, before=None):
        """Check every invariant after a step; `finished`: [(operation, argv, exit code)];
        `before`: `outside()` before the step."""
        snap, resolved, live = self.state()
        pairs = set(zip(live.column("image_id").to_pylist(), live.column("run").to_pylist())) if snap else set()
        live_ids = [i for i, _ in pairs]
        assert snap is None or len(live_ids) == live.num_rows, "an image is live twice"
        blocked = set(resolved.filter(resolved.column("blocked")).column("image_id").to_pylist()) if snap else set()
        if snap is not None:
            self.live_at[snap.version] = pairs
            self.check_files(snap)
        self.check_takedowns(finished, blocked, set(live_ids))
        held, artifact = self.check_index(snap, pairs, blocked)
        self.check_runs(finished, dict(pairs), blocked)
        self.check_progress(finished, before, set(live_ids), blocked, held, pairs)
        self.self_query(artifact, dict(pairs))
        self.counts["checks"] += 1
        return {"live": len(live_ids), "blocked": len(blocked), "index_sequence": self.sequence,
                "table_version": None if snap is None else snap.version}  # fmt: skip

    def check_files(self, snap):
        from delf_index.runtime import tables

        for uri in snap.files:  # every file the snapshot names is there and readable
            tables.read_columns(uri, ["image_id"])

    def check_takedowns(self, finished, blocked, live_ids):
        """Only removals add takedowns, only restorations lift them, none is live, and a removal
        that exited 0 left no other record of its images on storage."""
        ids = {n: set(argv[argv.index("--ids") + 1].split(",")) for n, (op, argv, _) in enumerate(finished)
               if op in ("remove", "restore")}  # fmt: skip
        removed = {i for n, s in ids.items() if finished[n][0] == "remove" for i in s}
        restored = {i for n, s in ids.items() if finished[n][0] == "restore" for i in s}
        assert blocked <= self.blocked | removed, f"taken down without a removal: {blocked - self.blocked - removed}"
        assert self.blocked - restored <= blocked, f"a takedown came back: {self.blocked - restored - blocked}"
        assert not blocked & live_ids, "a taken-down image is live"
        for n, (op, argv, code) in enumerate(finished):
            if op == "remove" and code == 0 and argv[argv.index("--features") + 1] == self.features:
                assert ids[n] <= blocked, f"remove exited 0 but {ids[n] - blocked} are not taken down"
                if not ids[n] & restored:
                    left = self.records_on_storage(ids[n])
                    assert not left, f"remove exited 0 but the table's folder still holds {left}"
            if op == "restore" and code == 0:
                assert not ids[n] & blocked, f"restore exited 0 but {ids[n] & blocked} are still down"
        self.blocked = blocked

    def records_on_storage(self, ids):
        """Records of `ids` other than removals in any data file of the table's folder."""
        from delf_index.runtime import storage, tables

        fs, root = storage.uncached_filesystem(f"{self.features}/x")
        out = []
        for path in fs.ls(root.rsplit("/", 1)[0], detail=False):
            if path.endswith(".parquet"):
                with contextlib.suppress(tables.FileGone):
                    rows = tables.read_columns(storage.with_protocol(fs, path), ["image_id", "status"]).to_pylist()
                    out += [(path.rsplit("/", 1)[1], r["image_id"], r["status"]) for r in rows
                            if r["image_id"] in ids and r["status"] != "removed"]  # fmt: skip
        return out

    def check_index(self, snap, pairs, blocked):
        """The index: whole, bound to this table, and exactly the live records of the table
        version it names. Returns (its (image_id, run) pairs, the loaded artifact), or (None,
        None) before the first build."""
        from delf_index.indexing import artifact as art
        from delf_index.indexing.versions import current_entry, list_versions
        from delf_index.runtime import tables

        entry = current_entry(self.index)
        if entry is None:
            return None, None
        artifact = art.Artifact.load(self.index)
        source = artifact.manifest["features"]
        assert (source["table_id"], source["uri"]) == (snap.table_id, self.features), f"index names {source}"
        named = source["table_version"]
        assert entry["sequence"] >= self.sequence and named >= self.table_version, "the index went back"
        self.sequence, self.table_version = entry["sequence"], named
        held = {(i, artifact.runs[row] or "") for i, row in artifact.row_of.items()}
        if named not in self.live_at:
            with contextlib.suppress(tables.FileGone):  # a takedown of this step deleted its files since
                at = tables.live_records(tables.snapshot(self.features, named).read(["image_id", "status", "run"]))
                self.live_at[named] = set(zip(at.column("image_id").to_pylist(), at.column("run").to_pylist()))
        if named in self.live_at:
            expected = self.live_at[named]
            assert held == expected, f"index {entry['version']} differs from table version {named}: {held ^ expected}"
        else:  # every record it holds was live at a version seen, or now, or is taken down now
            self.counts["unverifiable"] += 1
            seen = set().union(pairs, *self.live_at.values())
            assert {p for p in held if p[0] not in blocked} <= seen, "the index holds records never live"
        versions = set(list_versions(self.index))
        self.counts["pruned"] += len(self.versions - versions)
        self.versions = versions
        return held, artifact

    def check_runs(self, finished, runs, blocked):
        """Unchanged bytes keep their live record; after a lone update or extract that exited 0,
        a rewritten image's live record is a newer one."""
        for name, run in runs.items():
            before = self.live_runs.get(name)
            if before is not None and run != before:
                assert name in self.rewritten, f"{name} was extracted again ({before} -> {run}), its bytes unchanged"
            if name in self.rewritten and run != self.rewritten[name]:  # extracted after the rewrite
                del self.rewritten[name]
        writers = [(op, code) for op, argv, code in finished if op in WRITERS]
        if writers in ([("update", 0)], [("extract", 0)]):
            stale = {n for n in self.rewritten if n not in blocked and n in self.listing}
            assert not stale, f"{writers[0][0]} exited 0 but the live records of {stale} are not their newest bytes'"
        self.live_runs = runs

    def check_progress(self, finished, before, live_ids, blocked, held, pairs):
        """A writer alone exits 0; wrong input is refused and changes nothing; what a lone
        update, append or removal leaves is the table's live images."""
        writers = [(op, code) for op, _, code in finished if op in WRITERS or op in WRONG]
        alone = len(writers) == 1
        for op, code in writers:
            if op in WRONG:
                assert code == 1, f"wrong input ({op}) exited {code}, not refused"
                assert self.outside() == before, f"wrong input ({op}) changed {before} to {self.outside()}"
            elif alone:
                assert code in (0, -9), f"{op} ran alone and exited {code}"
        if writers == [("update", 0)]:
            listed = set(self.listing) - blocked
            assert live_ids == listed, f"update exited 0; the table lacks {listed - live_ids}"
        if alone and writers[0][0] in ("update", "append", "remove") and writers[0][1] == 0:
            assert held == pairs, f"{writers[0][0]} exited 0 but the index is not the table's live images"

    def self_query(self, artifact, runs):
        """A live image whose current record the index holds, queried with its own photo, comes first."""
        from delf_index.indexing.retrieval import Index

        if artifact is None:
            return
        current = sorted(i for i, row in artifact.row_of.items() if runs.get(i) == (artifact.runs[row] or "")
                         and i not in self.rewritten and i in self.listing)  # fmt: skip
        if not current:
            return
        name = self.rng.choice(current)
        index = Index(artifact, extractor=self.extractor)
        results = index.search(picture(self.listing[name], self.seed), top_k=3, with_matches=False)
        self.extractor = index.extractor
        assert results and results[0].image_id == name, f"{name} queried with its own photo: {results[:3]}"
        self.counts["self_queries"] += 1


# -- a run -----------------------------------------------------------------------------------
def choose(system, rng, single_writer, kill_rate, cache_env, op=None):
    """A step: a mutation of the collection (a string), or one or two operations to run at
    once, each (name, argv, env, kill: a failpoint, a time to kill at, or None). `op` given
    (the tour): that operation alone, not killed."""
    tour = op is not None
    op = op or rng.choices(list(OPERATIONS), weights=list(OPERATIONS.values()))[0]
    if op == "mutate" or op in MUTATIONS:
        return system.mutate(None if op == "mutate" else op)
    op = rng.choice(WRONG) if op == "wrong" else op
    ops = [op]
    if not tour and rng.random() < 0.5:
        other = rng.choice([o for o in OPERATIONS if o not in ("mutate", "wrong")])
        if op not in WRONG and not (single_writer and other in WRITERS and op in WRITERS):
            ops.append(other)
        elif other == "query":  # wrong input runs alone, or beside a reader
            ops.append(other)
    known, chosen = system.known(), []
    for name in ops:
        argv = system.command(name, known)
        if argv is None:
            continue
        if name in WRITERS and rng.random() < 0.5:
            argv = argv + ["--wait"]
        grace = rng.choice(["0", "0", "1", "3"])  # seconds versions outlive their successor: readers meet prunes
        env, kill = {**cache_env, "DELF_INDEX_GRACE_SECONDS": grace}, None
        if name in WRITERS and not tour and rng.random() < kill_rate:
            if rng.random() < 0.5:
                env["DELF_INDEX_CRASH_AT"] = kill = rng.choice(CRASH_POINTS[name])
            else:
                kill = time.time() + rng.uniform(0.0, 6.0)
        chosen.append((name, argv, env, kill))
    return chosen


def execute(system, workers, chosen):
    """Run the chosen operations at once, killing them as chosen; (report, [(name, argv, exit
    code)]), the exit code -9 for a killed one."""
    index_existed = system.sequence > 0
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
    for name, argv, code in finished:
        if name == "query" and index_existed and system.index in argv:
            assert code in (0, -9), f"a reader failed (exit {code}) while writers ran"
        assert code in (0, 1, -9), f"{name} exited {code}: a bug, not a refusal (see the workers' log)"
    report = {
        "ops": [(name, code) for name, _, code in finished],
        "kills": [r[3] for r in running if r[3] and r[4] == -9],
    }
    return report, finished


def tour(rng):
    """Every operation kind once, in a seeded order (a restoration after a removal), with the
    collection rewritten and copied back on the way."""
    kinds = list(KINDS)
    rng.shuffle(kinds)
    if kinds.index("restore") < kinds.index("remove"):
        a, b = kinds.index("restore"), kinds.index("remove")
        kinds[a], kinds[b] = kinds[b], kinds[a]
    return ["rewrite", "copied back", *kinds]


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


def run(images, features, index, codebooks, steps, seed, single_writer=False, kill_rate=0.3, log=None, cache=None,
        other=None, require_all=False, broken=()):  # fmt: skip
    """`steps` random steps on a collection (the tour first, when they leave room for it);
    returns the summary. `other`: another features table (default: the codebooks' own
    table); `broken`: guards switched off in the jobs (runtime/failpoints.py, `broken`).
    Raises AssertionError at the first broken invariant."""
    rng = random.Random(seed)
    other = other or os.path.join(os.path.dirname(codebooks.rstrip("/")), "table")
    system = SystemUnderTest(images, features, index, codebooks, other, seed)
    cache_env = {"DELF_INDEX_CACHE": cache or tempfile.mkdtemp(prefix="chaos-cache-")}
    if broken:
        cache_env["DELF_INDEX_BREAK"] = ",".join(broken)
    log = log or open(os.devnull, "w")
    workers = [Worker(log), Worker(log)]
    summary = {"steps": 0, "operations": {}, "succeeded": {}, "exits": {}, "kills": 0}
    script = tour(rng) if steps >= 2 + len(KINDS) + 2 else []
    try:
        crash = {**cache_env, "DELF_INDEX_CRASH_AT": "extract:written"}
        for number in range(steps):
            # first an update that builds the index, then a new image and an update killed between
            # its files and its commit; the tour; random steps after
            if number == 0:
                chosen = [("update", system.command("update"), dict(cache_env), None)]
            elif number == 1:
                system.keep_stale_copy()
                system.mutate("new")
                chosen = [("update", system.command("update"), crash, "extract:written")]
            else:
                op = script[number - 2] if number - 2 < len(script) else None
                chosen = choose(system, rng, single_writer, kill_rate, cache_env, op)
            before = system.outside() if number else None
            if isinstance(chosen, str):
                report, finished = {"mutate": chosen}, []
            else:
                report, finished = execute(system, workers, chosen)
            report.update(system.check(finished, before), step=number)
            tally(summary, report, finished)
            print(json.dumps(report), flush=True)
    finally:
        for worker in workers:
            with contextlib.suppress(Exception):
                worker.close()
    summary.update(system.counts)
    if require_all:
        missing = [k for k in KINDS if not summary["succeeded"].get(k)]
        assert not missing, f"never succeeded: {missing}"
        assert summary["pruned"], "no version was ever pruned"
    return summary


def tally(summary, report, finished):
    """Count a step's operations, their exit codes and successes (a wrong input's: its refusal)."""
    summary["steps"] += 1
    summary["kills"] += len(report.get("kills", []))
    for name, _, code in finished:
        summary["operations"][name] = summary["operations"].get(name, 0) + 1
        summary["exits"][str(code)] = summary["exits"].get(str(code), 0) + 1
        if code == (1 if name in WRONG else 0):
            summary["succeeded"][name] = summary["succeeded"].get(name, 0) + 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", choices=("local", "s3", "gcs"), default="local")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-rate", type=float, default=0.3, help="share of writers killed")
    parser.add_argument("--workdir", help="default: a temporary folder")
    parser.add_argument(
        "--break", dest="broken", default="", help="guards to switch off in the jobs: the run must then fail "
        "(update-table-check, append-table-check, known-ids; runtime/failpoints.py)"
    )  # fmt: skip
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
                          cache=os.path.join(workdir, "cache"), require_all=True,
                          broken=[b for b in args.broken.split(",") if b])  # fmt: skip
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
