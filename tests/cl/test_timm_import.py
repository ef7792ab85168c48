"""cl.backbones.timm_import: timm loads without wandb, and nothing else loses wandb meanwhile."""

from __future__ import annotations

import textwrap

import pytest

from tests.helpers import python_json

# in a fresh process: a thread imports wandb while timm is being imported on the main one
SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    from cl.backbones.timm_import import import_timm

    got = {}

    def other():
        while "timm" not in sys.modules:
            time.sleep(0.001)
        got["timm_loading"] = not hasattr(sys.modules["timm"], "create_model")
        try:
            import wandb
            got["other_thread_wandb"] = hasattr(wandb, "init")
        except ImportError as e:
            got["other_thread_wandb"] = repr(e)

    thread = threading.Thread(target=other)
    thread.start()
    timm = import_timm()
    thread.join()
    print(json.dumps(got))
""")


ALONE = textwrap.dedent("""
    import json, sys
    from cl.backbones.timm_import import import_timm
    import_timm()
    import timm.utils.summary as summary
    got = {"after_timm": "wandb" in sys.modules, "timm_got_wandb": hasattr(summary, "wandb")}
    import wandb
    got["importable_after"] = hasattr(wandb, "init")
    print(json.dumps(got))
""")


def test_timm_loads_without_wandb_and_wandb_stays_importable():
    pytest.importorskip("wandb")
    got = python_json(ALONE, WANDB_MODE="offline")
    assert got == {"after_timm": False, "timm_got_wandb": False, "importable_after": True}


def test_another_thread_imports_wandb_while_timm_loads():
    pytest.importorskip("wandb")
    got = python_json(SCRIPT, WANDB_MODE="offline")
    assert got["timm_loading"] is True, got  # the import below happened inside the window
    assert got["other_thread_wandb"] is True, got
