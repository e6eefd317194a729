"""``d2llm fetch-data``: materialise the catalogued raw datasets in ``data.raw_dir``, verified.

Third-party data is never committed; the catalogue (d2llm.data.catalog) names each file with its
sha256, size and a public URL pinned to the origin commit. For every source asked for, each
file is taken from the first place that has a copy with the right hash:

1. mirror folders given explicitly (``--mirror DIR``, or ``D2LLM_DATA_MIRROR``), laid out as
   ``<mirror>/<folder>/<file>``;
2. ``../shared/data`` when it exists (this project's CI and development machines);
3. the file's URL.

A file already in place with the right hash is left alone, so a rerun with everything there does
nothing but hash the files. New files of a source are written into a staging folder inside
``raw_dir`` and renamed into place only when every file of that source has been verified: a
wrong hash, a missing file, a network error or an interruption leaves nothing partial behind
(a staging folder a killed run left is removed by the next run). What is in place is recorded
in ``raw_dir/fetched.json`` (sources, files and hashes only, so that it is the same on every
machine: DVC tracks it as the stage's output).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any, BinaryIO

from d2llm.data.catalog import Catalog, CatalogFile, CatalogSource
from d2llm.errors import DataError
from d2llm.fingerprint import file_sha256
from d2llm.jsonfile import write_json

log = logging.getLogger(__name__)

MIRROR_ENV = "D2LLM_DATA_MIRROR"
SHARED_MIRROR = Path("../shared/data")
RECORD = "fetched.json"
STAGING_PREFIX = ".fetch-"
DOWNLOAD_TIMEOUT_S = 60.0
_BLOCK = 1 << 20


@dataclass
class FetchReport:
    """What ``fetch_data`` found in place and what it brought, per source."""

    in_place: dict[str, int] = field(default_factory=dict)  # source -> files already verified
    fetched: dict[str, list[str]] = field(default_factory=dict)  # source -> "file <- place"

    def describe(self) -> str:
        lines = []
        for name in sorted(self.in_place.keys() | self.fetched.keys()):
            got = self.fetched.get(name, [])
            kept = self.in_place.get(name, 0)
            lines.append(f"{name}: {kept} file(s) in place, {len(got)} fetched")
            lines += [f"  {entry}" for entry in got]
        if not self.fetched:
            lines.append("every file in place and verified: nothing fetched")
        return "\n".join(lines)


def mirror_places(mirror: str | Path | None = None, root: str | Path = ".") -> list[Path]:
    """The mirror folders to try, in order: ``mirror`` (else $D2LLM_DATA_MIRROR), then
    ``<root>/../shared/data`` when it exists (``root``: the project folder)."""
    shared = Path(root) / SHARED_MIRROR
    places = []
    explicit = mirror or os.environ.get(MIRROR_ENV)
    if explicit:
        path = Path(explicit)
        if not path.is_dir():
            raise DataError(f"data mirror {path} is not a folder (from --mirror or ${MIRROR_ENV})")
        places.append(path)
    if shared.is_dir() and shared.resolve() not in {p.resolve() for p in places}:
        places.append(shared)
    return places


def fetch_data(
    catalog: Catalog,
    sources: Iterable[str],
    raw_dir: str | Path,
    places: list[Path],
    *,
    download: bool = True,
    progress: bool | None = None,
    record: bool = True,
) -> FetchReport:
    """Make ``raw_dir/<folder>/`` hold every catalogued file of ``sources``, each verified.

    ``places`` are mirror folders (see ``mirror_places``); ``download=False`` never goes to the
    network. ``progress``: a progress bar per download (None: only on a terminal). ``record``:
    write ``fetched.json`` for exactly these sources (the DVC stage's output). Raises
    DataError naming the file, its expected hash and every place tried with what it held.
    """
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(raw_dir)
    names = list(dict.fromkeys(sources))
    entries = {name: catalog.source(name) for name in names}
    report = FetchReport()
    for name, entry in entries.items():
        missing = [f for f in entry.files if not _verified(raw_dir / entry.folder / f.path, f)]
        report.in_place[name] = len(entry.files) - len(missing)
        if missing:
            report.fetched[name] = _fetch_source(entry, missing, raw_dir, places, download, progress)
    if record:
        _write_record(raw_dir, entries)
    return report


def verify_source(entry: CatalogSource, raw_dir: str | Path) -> list[str]:
    """Problems with ``raw_dir/<folder>`` against the catalogue (empty when every file checks out)."""
    problems = []
    for f in entry.files:
        path = Path(raw_dir) / entry.folder / f.path
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        actual = file_sha256(path)
        if actual != f.sha256:
            problems.append(f"{path}: sha256 {actual}, the catalogue says {f.sha256}")
    return problems


def check_source(name: str, entry: CatalogSource, raw_dir: str | Path) -> None:
    """Refuse to use ``raw_dir/<folder>`` unless every catalogued file is there with its hash."""
    folder = Path(raw_dir) / entry.folder
    if not folder.is_dir():
        raise DataError(f"source {name!r}: folder {folder} not found: run `d2llm fetch-data` to fetch it")
    problems = verify_source(entry, raw_dir)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise DataError(
            f"raw data of {entry.title!r} does not match the data catalogue:\n{listing}\n"
            "Run `d2llm fetch-data` to put verified copies in place."
        )


# --------------------------------------------------------------------------- one source


def _verified(path: Path, f: CatalogFile) -> bool:
    if not path.is_file():
        return False
    if path.stat().st_size == f.size and file_sha256(path) == f.sha256:
        return True
    log.warning("%s does not match the catalogue (modified or corrupt): fetching a verified copy", path)
    return False


def _fetch_source(
    entry: CatalogSource,
    files: list[CatalogFile],
    raw_dir: Path,
    places: list[Path],
    download: bool,
    progress: bool | None,
) -> list[str]:
    """Fetch ``files`` of one source into a staging folder, then rename them into place together."""
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{entry.folder}-", dir=raw_dir))
    try:
        got = []
        for f in files:
            where = _fetch_file(entry.folder, f, staging / f.path, places, download, progress)
            got.append(f"{f.path} <- {where}")
        for f in files:
            target = raw_dir / entry.folder / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / f.path, target)
        return got
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fetch_file(
    folder: str, f: CatalogFile, dest: Path, places: list[Path], download: bool, progress: bool | None
) -> str:
    """Write a verified copy of ``f`` to ``dest``; returns where it came from."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tried = []
    for place in places:
        source = place / folder / f.path
        if not source.is_file():
            tried.append(f"{source}: not there")
            continue
        with source.open("rb") as fh:
            actual = _copy_hashed(fh, dest)
        if actual == f.sha256:
            return str(place)
        tried.append(f"{source}: sha256 {actual}")
    if download:
        try:
            actual = _download(f, dest, progress)
        except (OSError, HTTPException) as err:  # URLError, timeouts, refused, truncated reads
            tried.append(f"{f.url}: download failed ({type(err).__name__}: {err})")
        else:
            if actual == f.sha256:
                return f.url
            tried.append(f"{f.url}: sha256 {actual}")
    else:
        tried.append(f"{f.url}: not tried (downloads off)")
    dest.unlink(missing_ok=True)
    listing = "\n".join(f"  - {line}" for line in tried)
    raise DataError(
        f"{folder}/{f.path}: no copy with the expected sha256 {f.sha256} ({f.size} bytes). Tried:\n"
        f"{listing}\nNothing was written for this source. Put the published file in a mirror "
        f"(--mirror DIR or ${MIRROR_ENV}, laid out as <mirror>/{folder}/{f.path}) or check the network."
    )


def _copy_hashed(src: BinaryIO, dest: Path, on_block: Callable[[int], Any] | None = None) -> str:
    digest = hashlib.sha256()
    with dest.open("wb") as out:
        for block in iter(lambda: src.read(_BLOCK), b""):
            digest.update(block)
            out.write(block)
            if on_block is not None:
                on_block(len(block))
    return digest.hexdigest()


def _download(f: CatalogFile, dest: Path, progress: bool | None) -> str:
    import urllib.request

    from tqdm.auto import tqdm

    log.info("downloading %s", f.url)
    request = urllib.request.Request(f.url, headers={"User-Agent": "d2llm-fetch-data"})
    hide = None if progress is None else not progress  # None: tqdm shows it on a terminal only
    with (
        urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response,
        tqdm(total=f.size, unit="B", unit_scale=True, desc=Path(f.path).name, disable=hide) as bar,
    ):
        digest = _copy_hashed(response, dest, bar.update)
    announced, got = response.headers.get("Content-Length"), dest.stat().st_size
    if announced is not None and got < int(announced):  # read(n) returns short at EOF, no error
        raise ConnectionError(f"connection closed after {got} of {announced} bytes")
    return digest


def _remove_stale_staging(raw_dir: Path) -> None:
    """Staging folders of a run that was killed before it could clean up (runs hold the lock)."""
    for stale in raw_dir.glob(f"{STAGING_PREFIX}*"):
        if stale.is_dir():
            log.info("removing %s, left by an interrupted fetch", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _write_record(raw_dir: Path, entries: dict[str, CatalogSource]) -> None:
    """``fetched.json``: the sources in place with their files' hashes (no times, no places)."""
    record = {
        "version": 1,
        "sources": {
            name: {"folder": e.folder, "files": {f.path: f.sha256 for f in e.files}}
            for name, e in sorted(entries.items())
        },
    }
    path = raw_dir / RECORD
    if path.is_file():
        try:
            if json.loads(path.read_text(encoding="utf-8")) == record:
                return  # unchanged: leave the file (and its mtime) alone
        except ValueError:
            pass
    write_json(path, record, indent=1)
