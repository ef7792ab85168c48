from __future__ import annotations

from pathlib import Path

import pytest

from cl.errors import ConfigError, DataError
from scenarios.sources.fortunes import load_fortunes, parse_fortunes, read_fortunes, select_categories


def write_category(folder: Path, name: str, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(
        "\n%\n".join(f"{name} saying number {i}\n\t-- someone" for i in range(n)) + "\n%\n"
    )


@pytest.fixture
def fortune_dir(tmp_path) -> Path:
    write_category(tmp_path, "alpha", 20)
    write_category(tmp_path, "beta", 10)
    write_category(tmp_path, "gamma", 3)
    write_category(tmp_path / "off", "rude", 50)  # offensive subfolder: skipped
    (tmp_path / "alpha.dat").write_bytes(b"\x00\x01binary")
    (tmp_path / "alpha.u8").symlink_to(tmp_path / "alpha")
    return tmp_path


def test_parse_fortunes_strips_and_skips_empty():
    text = "first\nline\n%\n\n%\n  second  \n%\n%\nthird"
    assert parse_fortunes(text) == ["first\nline", "second", "third"]


def test_read_fortunes_skips_index_links_and_subfolders(fortune_dir):
    cats = read_fortunes(str(fortune_dir))
    assert sorted(cats) == ["alpha", "beta", "gamma"]
    assert len(cats["alpha"]) == 20 and cats["alpha"][0].startswith("alpha saying number 0\n")


def test_load_fortunes_stratified_split(fortune_dir):
    train, test, names = load_fortunes(str(fortune_dir), min_entries=10, test_fraction=0.2, seed=0)
    assert names == ["alpha", "beta"]
    assert train.targets.bincount().tolist() == [16, 8] and test.targets.bincount().tolist() == [4, 2]
    assert all(isinstance(x, str) for x in train.inputs)
    assert set(train.inputs).isdisjoint(test.inputs)
    assert all(x.startswith(names[y]) for x, y in zip(test.inputs, test.targets.tolist(), strict=True))
    other = load_fortunes(str(fortune_dir), min_entries=10, seed=1)[1]
    assert other.inputs != test.inputs
    assert load_fortunes(str(fortune_dir), min_entries=10, seed=0)[1].inputs == test.inputs


def test_explicit_categories(fortune_dir):
    names = load_fortunes(str(fortune_dir), categories=["gamma", "alpha"])[2]
    assert names == ["alpha", "gamma"]
    with pytest.raises(ConfigError, match=r"unknown fortune categories \['zeta'\]"):
        load_fortunes(str(fortune_dir), categories=["zeta"])


def test_missing_or_too_small_folders_name_the_package(tmp_path, fortune_dir):
    with pytest.raises(DataError, match="apt-get install fortunes"):
        load_fortunes(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"only 0 fortune categories have >= 150 entries.*fortunes-min"):
        load_fortunes(str(fortune_dir))
    assert select_categories({"a": 5, "b": 7, "c": 1}, min_entries=5) == ["a", "b"]


@pytest.mark.realdata
def test_real_fortunes(fortunes_root):
    counts = {c: len(e) for c, e in read_fortunes(str(fortunes_root)).items()}
    big = sorted(c for c, n in counts.items() if n >= 150)
    assert len(big) >= 20 and "computers" in big
    train, test, names = load_fortunes(str(fortunes_root))
    assert names == big
    assert set(train.targets.tolist()) == set(test.targets.tolist()) == set(range(len(big)))
    assert abs(len(test) / (len(train) + len(test)) - 0.2) < 0.01
