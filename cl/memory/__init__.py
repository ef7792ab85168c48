"""The experience memory: vectors with typed metadata over FAISS (exemplars, adapter keys, prototypes, tasks, and
kinds of your own).

    from cl.memory import ExperienceMemory
    mem = ExperienceMemory(dim=384, path="runs/x/memory", metric="ip", index="auto")
    ids = mem.add(vectors, [{"kind": "prototype", "experience": 0, "class": 3}, ...])
    hits = mem.search(queries, k=10, kind="adapter_key")
    mem.remove(ids); mem.save()
    mem = ExperienceMemory.load("runs/x/memory")

    notes = ExperienceMemory(dim=384, kinds=["note"], fields={"source": str})  # a kind and a typed field of your own
    notes.add(vectors, [{"kind": "note", "source": "wiki", "lang": "en"}, ...])
    notes.search(queries, k=5, kind="note", source="wiki", lang="en")           # any metadata key filters

The whole API, standalone: docs/memory.md.
"""

from cl.memory.config import MemoryConfig
from cl.memory.index import IndexConfig
from cl.memory.memory import Entries, ExperienceMemory, Hit, SearchResult
from cl.memory.persist import FORMAT_VERSION
from cl.memory.store import COLUMNS, FIELD_TYPES, FILTERS, KINDS

__all__ = ["COLUMNS", "FIELD_TYPES", "FILTERS", "FORMAT_VERSION", "KINDS", "Entries", "ExperienceMemory", "Hit",
           "IndexConfig", "MemoryConfig", "SearchResult"]
