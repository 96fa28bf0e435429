"""Where a run lives: a local folder, an absolute path on a shared mount, or a URI (s3://, gs://, any
pyarrow or fsspec filesystem). One small layer every process (driver, Train worker, Tune trial, Serve
replica) uses to read and write artifacts.

    store = RunStore("s3://bucket/runs/small")      # or "/mnt/nfs/runs/small", or "runs/small" on a laptop
    store.meta("teacher")                           # its meta.json, or None
    with store.writer("teacher") as out: ...        # a local folder, published whole when the block ends
    store.fetch("teacher")                          # a local folder holding the artifact's files

An artifact is a folder with a `meta.json` that lists its files with their sha256 (`write_meta` adds the
manifest); a sub-folder with its own `meta.json` is a nested artifact (`experts/fr`), fetched on its own.
`meta.json` is written last, so a reader never sees a half-written artifact as complete:
- on a local or mounted folder the stage is written into a hidden sibling and renamed into place (the
  previous artifact stays intact until the new one is whole);
- on an object store (no rename) the old `meta.json` goes first, then the files, then the new `meta.json`:
  an interrupted publish leaves the stage absent (the next run makes it again), never half of it.
`fetch` on a local or mounted run returns the folder itself; on a URI it downloads the manifest's files
into a node-local cache keyed by the hash of `meta.json` (which names every file's hash), into a private
temporary folder renamed into place: several processes on one node may fetch at once. The cache is
`$MOME_CACHE_DIR`, else `~/.cache/mome/artifacts`.
Endpoint and credentials come from the usual environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...,
`GOOGLE_APPLICATION_CREDENTIALS`) or from the URI's query options (`s3://b/p?endpoint_override=...`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from functools import cached_property
from pathlib import Path
from typing import Iterator

from mome_ray.errors import MomeError

MANIFEST_SKIP = ("meta.json",)


def is_uri(location: str) -> bool:
    return "://" in str(location)


def cache_root() -> Path:
    return Path(os.environ.get("MOME_CACHE_DIR") or Path.home() / ".cache" / "mome" / "artifacts")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest(folder: Path) -> dict[str, dict]:
    """{relative path: {sha256, size}} of an artifact's own files: hidden entries and nested artifacts
    (sub-folders with their own meta.json) left out."""
    folder = Path(folder)
    out = {}

    def walk(d: Path) -> None:
        for p in sorted(d.iterdir()):
            if p.name.startswith("."):
                continue
            if p.is_dir():
                if not (p / "meta.json").is_file():
                    walk(p)
            elif p.relative_to(folder).as_posix() not in MANIFEST_SKIP:
                out[p.relative_to(folder).as_posix()] = {"sha256": sha256_file(p), "size": p.stat().st_size}

    walk(folder)
    return out


def _filesystem(uri: str):
    """(pyarrow filesystem, root path inside it) for a URI; fsspec covers the schemes pyarrow lacks."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid for a scheme it does not know
        first = e
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise MomeError(f"cannot open run storage '{uri}': {first}; {e}") from e
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


class RunStore:
    """A run directory on any filesystem. Picklable: it carries only its location string."""

    def __init__(self, location: str | Path):
        location = str(location)
        self.remote = is_uri(location)
        self.location = location.rstrip("/") if self.remote else str(Path(location).absolute())

    def __reduce__(self):
        return RunStore, (self.location,)

    def __repr__(self) -> str:
        return f"RunStore({self.location!r})"

    @property
    def name(self) -> str:
        """The run's last path component (e.g. `small`): a readable prefix for run names."""
        return self.location.split("?")[0].rstrip("/").rsplit("/", 1)[-1]

    def uri(self, *parts: str) -> str:
        """The location of a file or folder of the run, as a URI or an absolute path."""
        if not self.remote:
            return str(Path(self.location, *parts))
        base, _, query = self.location.partition("?")
        return "/".join([base, *parts]) + (f"?{query}" if query else "")

    @cached_property
    def _fs(self):
        return _filesystem(self.location)

    def _path(self, *parts: str) -> str:
        return "/".join([self._fs[1].rstrip("/"), *parts])

    # --- reading -----------------------------------------------------------------------------------

    def read_bytes(self, rel: str) -> bytes | None:
        """A file of the run, or None when it is absent."""
        if not self.remote:
            p = Path(self.location, rel)
            return p.read_bytes() if p.is_file() else None
        fs = self._fs[0]
        try:
            with fs.open_input_stream(self._path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            if "not found" in str(e).lower() or "does not exist" in str(e).lower() or "NoSuchKey" in str(e):
                return None
            raise MomeError(f"cannot read '{self.uri(rel)}': {e}; check the storage endpoint and credentials "
                            f"(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)") from e

    def meta(self, stage: str) -> dict | None:
        raw = self.read_bytes(f"{stage}/meta.json")
        return None if raw is None else json.loads(raw)

    def exists(self, rel: str) -> bool:
        if not self.remote:
            return Path(self.location, rel).exists()
        import pyarrow.fs as pafs

        return self._fs[0].get_file_info(self._path(rel)).type != pafs.FileType.NotFound

    def fetch(self, stage: str) -> Path:
        """A local folder with `stage`'s files: the folder itself for a local run, else a cached download."""
        if not self.remote:
            return Path(self.location, stage)
        raw = self.read_bytes(f"{stage}/meta.json")
        if raw is None:
            raise MomeError(f"no '{stage}' artifact in '{self.location}'")
        key = hashlib.sha256(raw).hexdigest()[:32]
        dest = cache_root() / key
        if (dest / "meta.json").is_file():
            return dest
        files = json.loads(raw).get("files")
        if files is None:
            raise MomeError(f"'{self.uri(stage, 'meta.json')}' lists no files (written by an older mome-ray); "
                            f"re-run the stage that makes '{stage}'")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{key}.{uuid.uuid4().hex}"
        try:
            for rel, info in files.items():
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                self._download(f"{stage}/{rel}", target)
                if sha256_file(target) != info["sha256"]:
                    raise MomeError(f"'{self.uri(stage, rel)}' does not match its meta.json (changed while "
                                    f"being read?); run the command again")
            (tmp / "meta.json").write_bytes(raw)
            try:
                tmp.rename(dest)
            except OSError:  # another process on this node finished first: its copy is the same
                if not (dest / "meta.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def children(self, stage: str) -> list[str]:
        """The nested artifacts of `stage` (its sub-folders with a meta.json), by name."""
        if not self.remote:
            d = Path(self.location, stage)
            return sorted(p.name for p in d.iterdir() if (p / "meta.json").is_file()) if d.is_dir() else []
        import pyarrow.fs as pafs

        fs, base = self._fs[0], self._path(stage)
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=True))
        names = {i.path[len(base):].strip("/").split("/")[0] for i in infos
                 if i.type == pafs.FileType.File and i.path.endswith("/meta.json") and i.path.count("/") - base.count("/") == 2}
        return sorted(n for n in names if not n.startswith("."))

    @contextlib.contextmanager
    def view(self, stages: list[str]) -> Iterator[Path]:
        """A local folder laid out like the run, holding the listed artifacts that exist (`experts/*` = every
        nested artifact of `experts`), linked from this node's cache: path-based code reads it as RUN_DIR.
        A local run is its own view."""
        if not self.remote:
            yield Path(self.location)
            return
        root = cache_root().parent / "views"
        root.mkdir(parents=True, exist_ok=True)
        view = Path(tempfile.mkdtemp(dir=root))
        try:
            for stage in stages:
                names = ([f"{stage[:-2]}/{c}" for c in self.children(stage[:-2])] if stage.endswith("/*")
                         else [stage])
                for name in names:
                    if self.meta(name) is None:
                        continue
                    (view / name).mkdir(parents=True, exist_ok=True)  # entries linked one by one, so a
                    for entry in self.fetch(name).iterdir():     # stage and its nested artifacts can share it
                        (view / name / entry.name).symlink_to(entry)
            yield view
        finally:
            shutil.rmtree(view, ignore_errors=True)  # the links only; the cached artifacts stay

    def _download(self, rel: str, target: Path) -> None:
        _download(self._fs[0], self._path(rel), target)

    # --- writing -----------------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        """One file of the run (replaced atomically on a local folder)."""
        if not self.remote:
            p = Path(self.location, rel)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            tmp.replace(p)
            return
        with self._output(rel) as f:
            f.write(data)

    def upload(self, local: Path, rel: str) -> None:
        if not self.remote:
            dest = Path(self.location, rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, dest)
            return
        with open(local, "rb") as src, self._output(rel) as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)

    def _output(self, rel: str):
        fs, path = self._fs[0], self._path(rel)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)  # a no-op on object stores
        return fs.open_output_stream(path)

    def delete(self, rel: str) -> None:
        """Remove a file or folder of the run if present (e.g. a Train run's checkpoints for --fresh)."""
        if not self.remote:
            p = Path(self.location, rel)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            return
        import pyarrow.fs as pafs

        fs, path = self._fs[0], self._path(rel)
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif kind == pafs.FileType.File:
            fs.delete_file(path)

    @contextlib.contextmanager
    def writer(self, stage: str, nested: bool = False) -> Iterator[Path]:
        """Yield a local folder to write `stage` into; publish it when the block ends without error.

        The block must write `meta.json` (with `write_meta`). `nested=True` is for a stage whose folder
        also holds nested artifacts (`experts/<name>`): they are kept, only the stage's own files change.
        """
        if not self.remote and not nested:
            with _swap_local(Path(self.location), stage) as out:
                yield out
            return
        tmp = Path(tempfile.mkdtemp(prefix=".stage-", dir=_scratch_dir(self)))
        try:
            yield tmp
            if not (tmp / "meta.json").is_file():
                raise RuntimeError(f"stage '{stage}' wrote no meta.json")  # a bug in the stage
            self.publish(tmp, stage)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def publish(self, folder: Path, stage: str) -> None:
        """Copy a complete artifact folder (meta.json included) to `stage`: old meta first, new meta last."""
        new = json.loads((Path(folder) / "meta.json").read_text())
        old = self.meta(stage)
        self.delete(f"{stage}/meta.json")
        for rel in (old or {}).get("files", {}):
            if rel not in new["files"]:
                self.delete(f"{stage}/{rel}")
        for rel in new["files"]:
            self.upload(Path(folder) / rel, f"{stage}/{rel}")
        self.upload(Path(folder) / "meta.json", f"{stage}/meta.json")


def _download(fs, path: str, target: Path) -> None:
    with fs.open_input_stream(path) as src, open(target, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)


def _scratch_dir(store: RunStore) -> str:
    """Local scratch space for a stage being written: beside the run when it is a folder (same device)."""
    if not store.remote:
        Path(store.location).mkdir(parents=True, exist_ok=True)
        return store.location
    root = cache_root().parent / "scratch"
    root.mkdir(parents=True, exist_ok=True)
    return str(root)


@contextlib.contextmanager
def _swap_local(run_dir: Path, stage: str) -> Iterator[Path]:
    """Write into RUN_DIR/.stage.tmp and swap it in as RUN_DIR/stage on success."""
    final = run_dir / stage
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = final.with_name(f".{final.name}.tmp"), final.with_name(f".{final.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not (tmp / "meta.json").is_file():
        raise RuntimeError(f"stage '{stage}' wrote no meta.json")  # a bug in the stage, not user error
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def fetch_tree(uri: str) -> Path:
    """Every file under a folder URI (e.g. `corpus.user_dir=s3://bucket/texts`), downloaded once per node
    into the cache, keyed by the listing (names, sizes, modification times)."""
    import pyarrow.fs as pafs

    fs, base = _filesystem(uri)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=True))
             if i.type == pafs.FileType.File]
    if not infos:
        raise MomeError(f"'{uri}' holds no files")
    listing = sorted((i.path[len(base):].lstrip("/"), i.size, str(i.mtime)) for i in infos)
    dest = cache_root() / ("tree-" + hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:32])
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}"
    try:
        for rel, _, _ in listing:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            _download(fs, f"{base.rstrip('/')}/{rel}", tmp / rel)
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
