"""The experience memory: vectors with typed metadata over FAISS (exemplars, adapter keys, prototypes, tasks).

    from cl.memory import ExperienceMemory
    mem = ExperienceMemory(dim=384, path="runs/x/memory", metric="ip", index="auto")
    ids = mem.add(vectors, [{"kind": "prototype", "experience": 0, "class": 3}, ...])
    hits = mem.search(queries, k=10, kind="adapter_key")
    mem.remove(ids); mem.save()
    mem = ExperienceMemory.load("runs/x/memory")
"""

from cl.memory.config import MemoryConfig
from cl.memory.index import IndexConfig
from cl.memory.memory import Entries, ExperienceMemory, Hit, SearchResult
from cl.memory.persist import FORMAT_VERSION
from cl.memory.store import COLUMNS, FILTERS, KINDS

__all__ = ["COLUMNS", "FILTERS", "FORMAT_VERSION", "KINDS", "Entries", "ExperienceMemory", "Hit", "IndexConfig",
           "MemoryConfig", "SearchResult"]
