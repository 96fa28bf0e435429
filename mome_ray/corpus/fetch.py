"""Fetch Debian packages into a cache folder without installing them.

Each package is downloaded with `apt-get download NAME` into a temporary folder and unpacked with
`dpkg-deb -x FILE CACHE/pkgs/NAME`; the system is never touched. The versions fetched are merged into
`CACHE/versions.json` so the corpus manifest can record them (Debian's mirror keeps only the current
point release, so versions are recorded, not pinned).

    fetch_packages(["fortunes", "manpages-fr"], Path(".cache/mome/debian"))
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mome_ray.errors import MomeError

N_PARALLEL = 3  # apt mirrors are happy with a few connections; more does not go faster
MARKER = ".mome-complete"  # holds the version; written last, so its presence means fully unpacked

_update_lock = threading.Lock()
_updated = False  # `apt-get update` runs at most once per process


def package_root(cache_dir: Path, package: str) -> Path:
    """The folder a package is unpacked into (its files keep their installed paths below it)."""
    return Path(cache_dir) / "pkgs" / package


def package_versions(cache_dir: Path) -> dict[str, str]:
    """The {package: version} map of everything fetched into `cache_dir` ({} if nothing yet)."""
    path = Path(cache_dir) / "versions.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def fetch_packages(packages: list[str], cache_dir: Path, progress: bool = True) -> dict[str, str]:
    """Download and unpack each package (skipping those already unpacked); return {package: version}."""
    cache_dir = Path(cache_dir)
    (cache_dir / "pkgs").mkdir(parents=True, exist_ok=True)
    packages = list(dict.fromkeys(packages))  # keep order, drop repeats
    with ThreadPoolExecutor(N_PARALLEL) as pool:
        versions = dict(zip(packages, pool.map(lambda p: _fetch_one(p, cache_dir, progress), packages)))
    _write_versions(cache_dir, {**package_versions(cache_dir), **versions})
    return versions


def _fetch_one(package: str, cache_dir: Path, progress: bool) -> str:
    dest = package_root(cache_dir, package)
    if (dest / MARKER).exists():
        version = (dest / MARKER).read_text(encoding="utf-8").strip()
        _say(progress, f"{package:28s} {version:24s} cached")
        return version
    with tempfile.TemporaryDirectory(prefix="mome-fetch-") as tmp:
        deb = _download(package, Path(tmp))
        version = _run(["dpkg-deb", "-f", str(deb), "Version"], package).strip()
        # A half-unpacked folder from a killed fetch is removed, never reused.
        shutil.rmtree(dest, ignore_errors=True)
        _run(["dpkg-deb", "-x", str(deb), str(dest)], package)
        size_mb = deb.stat().st_size / 1e6
    (dest / MARKER).write_text(version + "\n", encoding="utf-8")
    _say(progress, f"{package:28s} {version:24s} fetched ({size_mb:.1f} MB .deb)")
    return version


def _download(package: str, tmp: Path) -> Path:
    """`apt-get download` into `tmp`; on 'unable to locate', refresh the package lists once and retry."""
    result = _apt_download(package, tmp)
    if result.returncode != 0 and _cannot_locate(result.stderr) and _apt_update():
        result = _apt_download(package, tmp)
    debs = sorted(tmp.glob("*.deb"))
    if result.returncode != 0 or not debs:
        raise MomeError(
            f"could not fetch Debian package '{package}': {result.stderr.strip() or 'no .deb downloaded'}; "
            "check the package name, that apt can reach a mirror, and run 'apt-get update' (as root)"
        )
    return debs[0]


def _apt_download(package: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", "download", "-q", package], cwd=tmp, capture_output=True, text=True)


def _cannot_locate(stderr: str) -> bool:
    return "Unable to locate" in stderr or "has no installation candidate" in stderr or "Can't select" in stderr


def _apt_update() -> bool:
    """Run `apt-get update` once per process if we are root; True if it ran (now or before)."""
    global _updated
    with _update_lock:
        if _updated:
            return True
        if os.geteuid() != 0:
            return False
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True)
        _updated = True
        return True


def _run(cmd: list[str], package: str) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise MomeError(f"'{' '.join(cmd)}' failed for package '{package}': {result.stderr.strip()}")
    return result.stdout


def _write_versions(cache_dir: Path, versions: dict[str, str]) -> None:
    # Write then rename, so a killed fetch never leaves a truncated versions.json.
    path = cache_dir / "versions.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(sorted(versions.items())), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _say(progress: bool, line: str) -> None:
    if progress:
        print(line, flush=True)
