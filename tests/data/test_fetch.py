"""d2llm fetch-data on real files: from a mirror folder, over HTTP from a real local server,
refusing corrupt copies, leaving nothing behind when interrupted, and doing nothing on a rerun."""

from __future__ import annotations

import http.server
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from d2llm_data_helpers import RAW, REPO

from d2llm.cli import main
from d2llm.config import Params, params_from_dict
from d2llm.data.catalog import Catalog, load_catalog
from d2llm.data.fetch import RECORD, fetch_data, mirror_places
from d2llm.data.prepare import prepare_data
from d2llm.errors import DataError

SOURCES = ("trecqa", "rte")  # small real sources: 2 files each, 2.1 MB in all


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    full = load_catalog(REPO / "data" / "raw" / "catalog.yaml")
    return subset(full, *SOURCES)


@pytest.fixture
def mirror(tmp_path: Path, catalog: Catalog) -> Path:
    """A mirror folder laid out as <folder>/<file>, copied from the verified data/raw."""
    root = tmp_path / "mirror"
    for entry in catalog.sources.values():
        for f in entry.files:
            target = root / entry.folder / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(RAW / entry.folder / f.path, target)
    return root


def served_catalog(catalog: Catalog, base_url: str) -> Catalog:
    """The same files, their URLs pointing at ``base_url/<folder>/<file>``."""
    sources = {}
    for name, entry in catalog.sources.items():
        files = tuple(
            f.model_copy(update={"url": f"{base_url}/{entry.folder}/{f.path}"}) for f in entry.files
        )
        sources[name] = entry.model_copy(update={"files": files})
    return catalog.model_copy(update={"sources": sources})


class _TruncatingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files, but announces the full length of dev.tsv and sends half, then hangs up."""

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:
        if not self.path.endswith("/dev.tsv"):
            return super().do_GET()
        data = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True
        return None


@pytest.fixture
def server(mirror: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving the mirror folder; yields its base URL."""

    def handler(*args: object, **kwargs: object) -> http.server.SimpleHTTPRequestHandler:
        return _TruncatingHandler(*args, directory=str(mirror), **kwargs)  # type: ignore[arg-type]

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def subset(catalog: Catalog, *names: str) -> Catalog:
    return catalog.model_copy(update={"sources": {name: catalog.sources[name] for name in names}})


def _assert_verified(raw: Path, catalog: Catalog) -> None:
    for entry in catalog.sources.values():
        for f in entry.files:
            assert (raw / entry.folder / f.path).read_bytes() == (RAW / entry.folder / f.path).read_bytes()


def test_fetch_from_a_mirror_folder(tmp_path: Path, catalog: Catalog, mirror: Path) -> None:
    raw = tmp_path / "raw"
    report = fetch_data(catalog, SOURCES, raw, [mirror], download=False)
    _assert_verified(raw, catalog)
    assert sorted(report.fetched) == sorted(SOURCES)
    assert all(line.endswith(f"<- {mirror}") for lines in report.fetched.values() for line in lines)
    recorded = (raw / RECORD).read_text()
    assert set(re.findall(r'"(trecqa|rte)"', recorded)) == set(SOURCES)
    assert [p.name for p in raw.iterdir() if p.name.startswith(".")] == []


def test_fetch_downloads_from_a_real_http_server(tmp_path: Path, catalog: Catalog, server: str) -> None:
    served = served_catalog(catalog, server)
    raw = tmp_path / "raw"
    report = fetch_data(served, ["trecqa"], raw, places=[], progress=False)
    _assert_verified(raw, subset(catalog, "trecqa"))
    assert report.fetched["trecqa"] == [
        f"train.csv <- {server}/trecqa/train.csv",
        f"dev.csv <- {server}/trecqa/dev.csv",
    ]


def test_interrupted_download_leaves_nothing_behind(tmp_path: Path, catalog: Catalog, server: str) -> None:
    # rte's train.tsv downloads fine, then dev.tsv is cut off halfway: neither file may stay.
    raw = tmp_path / "raw"
    with pytest.raises(DataError) as caught:
        fetch_data(served_catalog(catalog, server), ["rte"], raw, places=[], progress=False)
    message = str(caught.value)
    assert (
        "rte/dev.tsv" in message
        and "download failed (ConnectionError: connection closed after 45171 of 90343 bytes)" in message
    )
    assert catalog.sources["rte"].files[1].sha256 in message  # the expected hash
    assert not (raw / "rte").exists()
    assert [p.name for p in raw.iterdir()] == []  # no staging folder, no record


def test_corrupt_copy_is_refused_naming_both_hashes(tmp_path: Path, catalog: Catalog, mirror: Path) -> None:
    bad = mirror / "trecqa" / "dev.csv"
    bad.write_bytes(bad.read_bytes()[:-10] + b"tampered!\n")
    from d2llm.fingerprint import file_sha256

    actual = file_sha256(bad)
    expected = next(f.sha256 for f in catalog.sources["trecqa"].files if f.path == "dev.csv")
    raw = tmp_path / "raw"
    with pytest.raises(DataError) as caught:
        fetch_data(catalog, ["trecqa"], raw, [mirror], download=False)
    message = str(caught.value)
    assert f"expected sha256 {expected}" in message
    assert f"{bad}: sha256 {actual}" in message
    assert "not tried (downloads off)" in message
    assert not (raw / "trecqa").exists()  # train.csv was fine, but the source is not half there


def test_second_run_is_a_no_op(tmp_path: Path, catalog: Catalog, mirror: Path) -> None:
    raw = tmp_path / "raw"
    fetch_data(catalog, SOURCES, raw, [mirror], download=False)
    before = {p: p.stat().st_mtime_ns for p in raw.rglob("*")}
    shutil.rmtree(mirror)  # nothing to fetch from any more: a rerun must not need it
    report = fetch_data(catalog, SOURCES, raw, [], download=False)
    assert report.fetched == {}
    assert report.in_place == {"trecqa": 2, "rte": 2}
    assert "nothing fetched" in report.describe()
    assert {p: p.stat().st_mtime_ns for p in raw.rglob("*")} == before


def test_a_modified_file_in_place_is_replaced_by_a_verified_copy(
    tmp_path: Path, catalog: Catalog, mirror: Path
) -> None:
    raw = tmp_path / "raw"
    fetch_data(catalog, ["trecqa"], raw, [mirror], download=False)
    (raw / "trecqa" / "train.csv").write_text("qtext,label,atext\n", encoding="utf-8")
    report = fetch_data(catalog, ["trecqa"], raw, [mirror], download=False)
    assert report.fetched["trecqa"] == [f"train.csv <- {mirror}"]
    _assert_verified(raw, subset(catalog, "trecqa"))


def test_no_mirror_and_no_network_names_every_place_tried(tmp_path: Path, catalog: Catalog) -> None:
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    # Port 9 on 127.0.0.1 (discard) is closed: the download fails at once, as offline would.
    offline = served_catalog(catalog, "http://127.0.0.1:9")
    with pytest.raises(DataError) as caught:
        fetch_data(offline, ["trecqa"], tmp_path / "raw", [empty], progress=False)
    message = str(caught.value)
    assert f"{empty}/trecqa/train.csv: not there" in message
    assert "http://127.0.0.1:9/trecqa/train.csv: download failed" in message
    assert "--mirror DIR" in message


def test_a_stale_staging_folder_is_removed(tmp_path: Path, catalog: Catalog, mirror: Path) -> None:
    raw = tmp_path / "raw"
    stale = raw / ".fetch-trecqa-killed"
    stale.mkdir(parents=True)
    (stale / "train.csv").write_bytes(b"half a file")
    fetch_data(catalog, ["trecqa"], raw, [mirror], download=False)
    assert not stale.exists()


def test_mirror_places_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    explicit.mkdir()
    env.mkdir()
    project = tmp_path / "project"
    (tmp_path / "shared" / "data").mkdir(parents=True)
    project.mkdir()
    monkeypatch.setenv("D2LLM_DATA_MIRROR", str(env))
    assert mirror_places(explicit, root=project) == [explicit, project / "../shared/data"]
    assert mirror_places(None, root=project) == [env, project / "../shared/data"]
    with pytest.raises(DataError, match="is not a folder"):
        mirror_places(tmp_path / "missing", root=project)


def test_prepare_refuses_a_raw_file_that_does_not_match_the_catalogue(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(RAW / "trecqa", raw / "trecqa")
    dev = raw / "trecqa" / "dev.csv"
    dev.write_bytes(dev.read_bytes().replace(b",1,", b",0,", 1))  # one label flipped: still parses
    params = params_from_dict({"data": {"sources": ["trecqa"]}})
    out = tmp_path / "out"
    with pytest.raises(
        DataError, match=r"(?s)dev\.csv: sha256 [0-9a-f]{64}, the catalogue says .*d2llm fetch-data"
    ):
        prepare_data(params, raw, out, catalog=REPO / "data" / "raw" / "catalog.yaml")
    assert not out.exists()


def test_cli_fetch_data(
    tmp_path: Path, mirror: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"  # no ../shared/data next to it: the given mirror is all there is
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.delenv("D2LLM_DATA_MIRROR", raising=False)
    raw = project / "raw"
    catalog = str(REPO / "data" / "raw" / "catalog.yaml")
    args = ["--params", str(REPO / "params.yaml"), "fetch-data", "--catalog", catalog, "--raw-dir", str(raw)]
    args += ["--mirror", str(mirror), "--no-download"]
    assert main([*args, "--source", "rte"]) == 0
    assert "rte: 0 file(s) in place, 2 fetched" in capsys.readouterr().out
    # Sources are placed one by one, each whole: trecqa lands, sick (not in this mirror) does not.
    assert main([*args, "--source", "trecqa", "--source", "sick"]) == 1
    assert "sick/SICK_train.txt: no copy with the expected sha256" in capsys.readouterr().err
    assert (raw / "trecqa" / "dev.csv").is_file() and not (raw / "sick").exists()


def test_default_params_sources_are_all_catalogued() -> None:
    catalog = load_catalog(REPO / "data" / "raw" / "catalog.yaml")
    for name in Params().data.sources:
        assert catalog.source(name).files
