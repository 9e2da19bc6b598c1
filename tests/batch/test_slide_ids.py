"""Output ids are checked before any slide: reserved, empty, over-long, hive-breaking or
colliding ids stop the batch with one line (exit 2), and dotfiles are not slides."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from slidefiles import write_tiff

from nucleiflow.pipeline.batch.manifest import MAX_ID, expand_slides, slide_id_for


def manifest(tmp_path: Path, *ids: str) -> str:
    m = tmp_path / "batch.csv"
    m.write_text("path,slide_id\n" + "".join(f"s{i}.svs,{sid}\n" for i, sid in enumerate(ids)), encoding="utf-8")
    return str(m)


@pytest.mark.parametrize("item, needle", [
    ("nuclei.tif", "reserved"),                         # would write into the hive root <out>/nuclei/
    ("NUCLEI.svs", "reserved"),
    ("切片.svs", "no usable output id"),                 # nothing ASCII left
    ("标本切片-01.svs", "no usable output id"),          # most of the name lost: ids would collide
    ("x" * (MAX_ID + 1) + ".svs", "characters"),
])
def test_bad_ids_from_file_names_are_refused(item, needle, tmp_path):
    with pytest.raises(ValueError, match=needle) as e:
        expand_slides([str(tmp_path / item)])
    assert "\n" not in str(e.value) and "slide_id" in str(e.value)


@pytest.mark.parametrize("sid, needle", [("nuclei", "reserved"), ("a=b", "no '='"), ("a/b", "no '='"),
                                         ("with space", "no '='"), ("_x", "start with")])
def test_bad_manifest_ids_are_refused(sid, needle, tmp_path):
    with pytest.raises(ValueError, match=needle):
        expand_slides([manifest(tmp_path, sid)])


def test_accents_fold_and_ids_differing_in_case_collide(tmp_path):
    assert slide_id_for("Ünï.svs") == "Uni" and slide_id_for("CMU-1 (copy).svs") == "CMU-1_copy_"
    with pytest.raises(ValueError, match="two slides map to the output id"):
        expand_slides([manifest(tmp_path, "Case", "case")])
    with pytest.raises(ValueError, match="two slides map to the output id"):
        expand_slides([str(tmp_path / "a" / "x.svs"), str(tmp_path / "b" / "x.svs")])


def test_folder_expansion_skips_dotfiles(tmp_path):
    write_tiff(tmp_path / "ok.tif", np.full((64, 64, 3), 200, np.uint8), mpp=0.5)
    (tmp_path / "._ok.tif").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # a macOS AppleDouble file
    assert [(Path(j.path).name, j.slide_id) for j in expand_slides([str(tmp_path)])] == [("ok.tif", "ok")]


def test_cli_refuses_a_reserved_id_before_any_slide_exit_2(tmp_path):
    exe = Path(sys.executable).with_name("nucleiflow")
    res = subprocess.run([str(exe), "segment", str(tmp_path / "nuclei.tif"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2 and "reserved" in res.stderr and "nuclei.tif" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
