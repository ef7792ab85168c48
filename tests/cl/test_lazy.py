"""cl.lazy: heavy libraries load where they are first used (faiss: when a memory first holds vectors)."""

from __future__ import annotations

import sys
import textwrap

import pytest

from cl.lazy import LazyModule, lazy_import
from tests.helpers import python_json

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from cl.memory import ExperienceMemory
    from cl.routing import KeyRouter
    seen = {"after_import": "faiss" in sys.modules}
    memory = ExperienceMemory(dim=8)
    seen["after_memory"] = "faiss" in sys.modules
    memory.add(np.eye(4, 8, dtype=np.float32), {"kind": "exemplar"})
    hits = memory.search(np.eye(1, 8, dtype=np.float32), k=2)
    seen["after_search"] = "faiss" in sys.modules
    seen["found"] = int(hits.ids.shape[1])
    print(json.dumps(seen))
""")


def test_faiss_loads_when_a_memory_first_holds_vectors():
    seen = python_json(SCRIPT)
    assert seen == {"after_import": False, "after_memory": False, "after_search": True, "found": 2}


def test_lazy_import_stands_in_until_an_attribute_is_read():
    assert lazy_import("json") is sys.modules["json"]  # imported already: the module itself
    name = "tests.cl._lazy_target"
    assert name not in sys.modules
    module = lazy_import(name)
    assert isinstance(module, LazyModule) and name not in sys.modules and "not imported yet" in repr(module)
    assert module.VALUE == 42 and name in sys.modules
    with pytest.raises(ModuleNotFoundError, match="no_such_library"):
        lazy_import("no_such_library")
