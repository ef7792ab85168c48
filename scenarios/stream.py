"""``Experience`` and ``Stream`` live in ``cl.experience`` (the data contract the engine consumes); re-exported here,
where streams are built, so ``from scenarios.stream import Experience`` keeps working."""

from cl.experience import KINDS, Experience, Stream

__all__ = ["KINDS", "Experience", "Stream"]
