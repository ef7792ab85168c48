"""``benchmarks.official``: checkouts are located and checked, their imports isolated; our side's harness runs on a
tiny ViT; with the official checkouts (``CL_SEMA_CODE``, ``CL_MOS_CODE``) the ``--quick`` run goes end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.official import ours
from benchmarks.official.__main__ import main
from benchmarks.official.checkouts import MOS_CODE, SEMA_CODE, locate, official_code


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), "-c", "user.email=t@t", "-c", "user.name=t", *args], check=True,
                   capture_output=True)


def test_locate_accepts_the_commit_warns_on_plain_folders_and_refuses_others(tmp_path, monkeypatch):
    monkeypatch.delenv(SEMA_CODE.env, raising=False)
    c = locate(SEMA_CODE, None)
    assert not c.usable and "--sema-code" in c.message and SEMA_CODE.env in c.message
    assert not locate(SEMA_CODE, tmp_path / "absent").usable
    assert not locate(SEMA_CODE, tmp_path).usable  # no models/sema.py: not their repository
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "sema.py").write_text("")
    plain = locate(SEMA_CODE, tmp_path)
    assert plain.usable and plain.message.startswith("WARNING") and plain.commit is None
    monkeypatch.setenv(SEMA_CODE.env, str(tmp_path))
    assert locate(SEMA_CODE, None).path == tmp_path.resolve()
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "x")
    other = locate(SEMA_CODE, tmp_path)
    assert not other.usable and "not 5a45512" in other.message and other.commit


def test_official_code_isolates_their_packages_and_undoes_the_shims(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    (tmp_path / "models" / "mos.py").write_text("import timm\nimport torch\n"
                                                "def build():\n"
                                                "    m = timm.create_model('vit_tiny_patch16_224', pretrained=True,"
                                                " num_classes=0, img_size=32, patch_size=8, embed_dim=32, depth=1,"
                                                " num_heads=2)\n"
                                                "    return m.cuda()\n")
    import timm

    create, cuda = timm.create_model, torch.nn.Module.cuda
    checkout = locate(MOS_CODE, tmp_path)
    with official_code(checkout):
        from models.mos import build

        assert isinstance(build(), torch.nn.Module)  # no weights fetched, no CUDA needed
    assert "models" not in sys.modules and "models.mos" not in sys.modules
    assert timm.create_model is create and torch.nn.Module.cuda is cuda
    assert str(tmp_path) not in sys.path


def test_main_skips_absent_checkouts(tmp_path, monkeypatch, capsys, restore_threads):
    for code in (SEMA_CODE, MOS_CODE):
        monkeypatch.delenv(code.env, raising=False)
    out = tmp_path / "official.json"
    assert main(["--quick", "--sema-code", str(tmp_path / "no"), "--json", str(out)]) == 2
    text = capsys.readouterr()
    assert "cases [1, 2, 3, 4] skipped" in text.out and "case 5 skipped" in text.out and "--mos-code" in text.out
    assert not out.exists()


def test_our_side_harness_on_a_tiny_vit():
    sizes = ours.Sizes(images=6, batch=4, epochs=2, descriptor_epochs=2, setup_images=4, mos_batch=4)
    gen = torch.Generator().manual_seed(0)
    agent = ours.sema_after_first_task("vit_tiny_test", sizes, gen)
    shape = agent.backbone.data_config.input_size
    first = agent.strategy.frozen_depth
    exp1 = ours.experience(1, ours.random_images(sizes.images, shape, gen), sizes.classes)
    new = ours.sema_begin_task(agent, exp1)
    assert new == {first: "e1"}  # one expansion, in the first adaptable block
    assert agent.strategy.states(exp1.train) is not None  # the scan filled the prefix cache
    adapter = agent.strategy.pools[first].adapters["e1"]
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    ours.sema_train_epoch(agent, exp1, new)
    ours.sema_train_epoch(agent, exp1, new, fill=True)
    assert any(not torch.equal(v, before[k]) for k, v in adapter.state_dict().items())  # it trained

    fresh = ours.sema_after_first_task("vit_tiny_test", sizes, gen)
    result = ours.sema_experience(fresh, exp1)
    assert result["adapters_per_layer"] == {str(first): 2, str(first + 1): 1, str(first + 2): 1}
    assert ours.epoch_timer(fresh).times and len(ours.epoch_timer(fresh).times) == sizes.epochs
    assert result["phases"]["descriptors"] > 0 and result["phases"]["fill"] > 0
    assert sum(result["phases"].values()) == pytest.approx(result["s"])
    ours.sema_predict(fresh, ours.random_images(5, shape, gen), sizes.batch)

    plain = ours.plain_backbone("vit_tiny_test")
    mos = ours.mos_with_tasks(plain, 3, sizes.classes, gen)
    assert sorted(mos.pools) == list(range(plain.num_blocks)) and len(mos.names) == 3
    ours.mos_predict(mos, ours.random_images(5, shape, gen), sizes.mos_batch)
    assert 2.0 <= mos.extra_metrics()["backbone_passes_per_image"] <= 3.0


def _official_checkouts() -> str | None:
    """Why the end-to-end test cannot run here, or None."""
    missing = [c.env for c in (SEMA_CODE, MOS_CODE) if not os.environ.get(c.env)]
    if missing:
        return (f"set {' and '.join(missing)} to checkouts of {SEMA_CODE.repo} @{SEMA_CODE.commit[:7]} and "
                f"{MOS_CODE.repo} @{MOS_CODE.commit[:7]} (not part of the project) to run the --quick smoke test")
    bad = [c.message for c in (locate(SEMA_CODE, None), locate(MOS_CODE, None)) if not c.usable]
    return "; ".join(bad) or None


@pytest.mark.slow
@pytest.mark.skipif(_official_checkouts() is not None, reason=str(_official_checkouts()))
def test_quick_runs_both_sides_end_to_end(tmp_path, restore_threads):
    pytest.importorskip("easydict", reason="the official code needs the 'official' extra: pip install -e .[official]")
    out = tmp_path / "official.json"
    assert main(["--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["threads"] == 1 and result["machine"]["cpus"] and not result["skipped"]
    for side in ("sema", "mos"):
        assert result["checkouts"][side]["usable"]
    cases = [(r["case"][0], r.get("T")) for r in result["rows"]]
    assert cases == [("1", None), ("2", None), ("3", None), ("4", None), ("5", 1), ("5", 2)]
    for r in result["rows"]:
        assert r["official img/s"] > 0 and r["ours img/s"] > 0 and len(r["official_s"]) == result["pairs"]
    whole = result["rows"][2]
    assert whole["adapters_per_layer"]["official"]["9"] == 2 and whole["adapters_per_layer"]["ours"]["9"] == 2
    assert [r["official passes/img"] for r in result["rows"][4:]] == [2, 3]
