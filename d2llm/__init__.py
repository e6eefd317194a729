"""d2llm: Decomposed and Distilled LLMs for semantic search (Liao et al., ACL 2024)."""

__version__ = "0.1.0"
