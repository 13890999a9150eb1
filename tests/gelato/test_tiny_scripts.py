"""The tiny pair's build scripts refuse bad input before they change anything: `export` loads both
models before it replaces the shipped ones (it deleted `assets/target` first, then failed on a
wrong folder, leaving the package without its default target), and `--heldout 0` is refused (a
`docs[:-0]` slice trained on nothing). Run on a copy of the assets, never on the package's."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from gelato.tiny import export
from gelato.tiny.train import positive_int


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def test_export_of_a_folder_lacking_a_model_leaves_the_shipped_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assets = tmp_path / "assets"
    shutil.copytree(export.ASSETS, assets)
    monkeypatch.setattr(export, "ASSETS", assets)
    before = digest(assets)
    src = tmp_path / "trained"
    shutil.copytree(assets / "target", src / "target")  # a target, and no drafter
    (src / "training.json").write_text(json.dumps({"note": "test"}))
    with pytest.raises(SystemExit) as info:
        export.main([str(src)])
    assert info.value.code == 2 and digest(assets) == before
    with pytest.raises(SystemExit):
        export.main([str(tmp_path / "nowhere")])
    assert digest(assets) == before


def test_heldout_must_keep_documents_out() -> None:
    assert positive_int("200") == 200
    for bad, says in (("0", "must be >= 1, got 0"), ("-3", "must be >= 1, got -3"), ("x", "not an integer: 'x'")):
        with pytest.raises(argparse.ArgumentTypeError) as info:
            positive_int(bad)
        assert str(info.value) == says
