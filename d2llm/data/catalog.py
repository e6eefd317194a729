"""The data catalogue (``data/raw/catalog.yaml``): what each built-in source is and how to check it.

Third-party datasets are never committed to this repository. The catalogue names, per source,
its files with a public URL pinned to the origin commit, their sha256 and size, and the terms
the data comes under. ``d2llm fetch-data`` (d2llm.data.fetch) materialises and verifies the
files from it; ``d2llm prepare`` refuses a raw file whose hash differs; model cards
(d2llm.tracking.model_card) read the licences and restrictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from d2llm.errors import DataError

CATALOG_VERSION = 1
# Restrictions on use, most restrictive first: a model card states the first one that applies.
Restriction = Literal["research-only", "non-commercial", "share-alike", "licence-unstated"]
RESTRICTIONS: tuple[Restriction, ...] = ("research-only", "non-commercial", "share-alike", "licence-unstated")


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CatalogFile(_Entry):
    """One published file: where it goes under the source's folder and how to check it."""

    path: str = Field(pattern=r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")  # relative, no '..'
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    url: str = Field(pattern=r"^https?://")


class Origin(_Entry):
    repo: str  # owner/name on GitHub
    commit: str = Field(pattern=r"^[0-9a-f]{40}$")


class CatalogSource(_Entry):
    """A built-in source: its folder under ``data.raw_dir``, terms of use and files."""

    folder: str = Field(pattern=r"^[a-z0-9][a-z0-9\-]*$")
    title: str
    family: Literal["nli", "sts", "asym", "ir"]
    origin: Origin
    licence: str
    restrictions: tuple[Restriction, ...] = ()
    attribution: str
    citation: str
    used_for: str
    files: tuple[CatalogFile, ...] = Field(min_length=1)


class Catalog(_Entry):
    version: Literal[1]
    sources: dict[str, CatalogSource]
    path: Path | None = None  # where it was read from (for messages)

    def source(self, name: str) -> CatalogSource:
        if name not in self.sources:
            raise DataError(
                f"source {name!r} is not in the data catalogue {self.path}; known: {sorted(self.sources)}"
            )
        return self.sources[name]

    def by_folder(self) -> dict[str, str]:
        """``{folder: source name}``."""
        return {entry.folder: name for name, entry in self.sources.items()}


def load_catalog(path: str | Path) -> Catalog:
    """Read and check the catalogue; a missing file or a bad entry is a DataError saying which."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"data catalogue {path} not found (it ships with the repository: data/raw/catalog.yaml)"
        ) from None
    except yaml.YAMLError as err:
        raise DataError(f"data catalogue {path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise DataError(f"data catalogue {path}: expected a mapping with 'version' and 'sources'")
    try:
        catalog = Catalog.model_validate({**raw, "path": path})
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors(include_url=False)
        )
        raise DataError(f"data catalogue {path}: {problems}") from None
    folders = [entry.folder for entry in catalog.sources.values()]
    duplicates = sorted({f for f in folders if folders.count(f) > 1})
    if duplicates:
        raise DataError(f"data catalogue {path}: folder(s) {duplicates} used by more than one source")
    return catalog


def most_restrictive(restrictions: set[str] | tuple[str, ...] | list[str]) -> list[str]:
    """The given restrictions in order, most restrictive first (RESTRICTIONS' order)."""
    return [r for r in RESTRICTIONS if r in set(restrictions)]
