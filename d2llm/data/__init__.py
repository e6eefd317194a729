"""Data layer: source parsers, canonical tables, custom datasets, validation (docs/data.md).

Downstream modules read prepared data through ``load_pairs`` and ``load_ir``.
"""

from d2llm.data.tables import IRDataset, load_ir, load_pairs, read_manifest

__all__ = ["IRDataset", "load_ir", "load_pairs", "read_manifest"]
