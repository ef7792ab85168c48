"""cl.allocator: freed tensor memory is reused instead of being mapped (and faulted in) again."""

from __future__ import annotations

import sys
import textwrap

import pytest

from tests.helpers import python_json

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# a pass that allocates 16 x 6 MiB and frees it all, as a forward pass frees its activations: where glibc maps such
# blocks anew or gives the freed top of its heap back to the system, the next pass faults every page in again
CHURN = textwrap.dedent("""
    import json, resource, sys
    import torch
    from cl.allocator import tune_allocator
    tuned = tune_allocator()

    def passes():
        for _ in range(10):
            held = [torch.empty(6 << 18).fill_(1.0) for _ in range(16)]
            del held

    passes()  # first touch of the memory: faults either way
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    passes()
    print(json.dumps({"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
""")
PAGES = 10 * 16 * (6 << 20) // 4096  # pages the measured passes touch


def churn(**env: str) -> dict:
    return python_json(CHURN, **env)


def test_tuned_process_reuses_freed_memory_without_page_faults():
    tuned = churn(CL_TUNE_ALLOCATOR="1")
    if not tuned["tuned"]:
        pytest.skip("no glibc mallopt here")
    assert tuned["faults"] < PAGES // 100, tuned
    # what it saves: blocks mapped anew on every allocation, as glibc's default does until its threshold rises (its
    # starting threshold, 128 KiB, held here; left to itself the default faults so in about half of all processes
    # here, depending on where the heap lands among the process's mappings)
    fresh = churn(MALLOC_MMAP_THRESHOLD_="131072")
    assert fresh["tuned"] is False and fresh["faults"] > PAGES // 2, (fresh, tuned)


def test_allocator_settings_from_the_environment_are_left_alone():
    assert churn(MALLOC_TRIM_THRESHOLD_="131072")["tuned"] is False
    assert churn(GLIBC_TUNABLES="glibc.malloc.hugetlb=1")["tuned"] is False
