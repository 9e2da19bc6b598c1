"""`nucleiflow view`: the README's screenshot line on the real segmented CMU slide, read back.

The PNG is checked against the real label raster: every yellow outline pixel, mapped back
through the printed camera to micrometres and then to label pixels, must lie on a nucleus
boundary; the same pixels shifted by a few micrometres must not (so the check can fail).
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from nucleiflow.flows.view import LAYER_NAMES, framing
from nucleiflow.pipeline.outputs.drawing import NUCLEUS

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
CLI = Path(sys.executable).parent / "nucleiflow"
SID = "CMU-1-Small-Region"
LINE = re.compile(r"^(?P<name>.+?)\s+(?P<shown>shown|hidden)\s+(?P<mpp>[\d.]+) um/px, corner \((?P<cy>[-\d.e]+), "
                  r"(?P<cx>[-\d.e]+)\) um, (?P<h>[\d.]+) x (?P<w>[\d.]+) um$")
CAMERA = re.compile(r"camera: centre \((?P<y>[\d.]+), (?P<x>[\d.]+)\) um, zoom (?P<zoom>[\d.e+-]+) px/um, "
                    r"canvas (?P<w>\d+)x(?P<h>\d+) px")


def readme_view_command() -> list[str]:
    """The `nucleiflow view ... --screenshot` line of README "Opening results", as argv."""
    section = README[README.index("## Opening results"):]
    line = next(ln for ln in section.splitlines() if ln.startswith("nucleiflow view") and "--screenshot" in ln)
    return shlex.split(line)


@pytest.fixture(scope="module")
def view_run(readme_run, tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    out, proc = readme_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    if shutil.which("Xvfb") is None:
        pytest.fail("Xvfb not found: apt-get install xvfb libxcb-icccm4 libxcb-keysyms1 (.ci/run does)",
                    pytrace=False)
    argv = readme_view_command()
    assert argv[:3] == ["nucleiflow", "view", f"out/{SID}"]
    cwd = tmp_path_factory.mktemp("view")
    (cwd / "out").symlink_to(out)  # the README runs in the folder holding out/
    res = subprocess.run([str(CLI)] + argv[1:], cwd=cwd, capture_output=True, text=True, timeout=300)
    png = cwd / argv[argv.index("--screenshot") + 1]
    return out, png, res


def parse(stdout: str) -> tuple[dict[str, dict], dict]:
    layers = {m["name"]: m.groupdict() for m in map(LINE.match, stdout.splitlines()) if m}
    camera = CAMERA.search(stdout)
    assert camera, stdout
    return layers, {k: float(v) for k, v in camera.groupdict().items()}


def test_readme_screenshot_layers_are_named_shown_and_aligned(view_run):
    out, png, res = view_run
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    layers, _ = parse(res.stdout)
    assert list(layers) == list(LAYER_NAMES)
    assert {n: layers[n]["shown"] for n in layers} == {
        "H&E": "shown", "nucleus probability": "hidden", "tissue": "hidden", "nuclei": "shown"}
    run = json.loads((out / SID / "run.json").read_text())
    assert float(layers["H&E"]["mpp"]) == pytest.approx(run["slide"]["mpp_x"], rel=1e-3)
    assert float(layers["nuclei"]["mpp"]) == pytest.approx(run["model_mpp"], rel=1e-3)
    he = layers["H&E"]
    for name in ("nuclei", "tissue", "nucleus probability"):
        lay = layers[name]
        # Same top-left corner (0, 0) um and the same extent, to within a model pixel.
        assert float(lay["cy"]) == pytest.approx(0, abs=1e-6) and float(lay["cx"]) == pytest.approx(0, abs=1e-6)
        assert float(he["cy"]) == pytest.approx(0, abs=1e-6) and float(he["cx"]) == pytest.approx(0, abs=1e-6)
        assert abs(float(lay["h"]) - float(he["h"])) <= float(lay["mpp"]) + 1e-6
        assert abs(float(lay["w"]) - float(he["w"])) <= float(lay["mpp"]) + 1e-6


def outline_hits(png: Path, camera: dict, labels: np.ndarray, mpp: float, shift_um: float = 0.0) -> tuple[int, float]:
    """Yellow pixels of ``png`` and the share of them on a nucleus boundary (+-2 label px)
    when mapped back through ``camera`` (and moved by ``shift_um`` along x)."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(np.int16)
    yellow = np.abs(rgb - np.array(NUCLEUS)).sum(axis=2) < 60
    rows, cols = np.nonzero(yellow)
    h, w = rgb.shape[:2]
    y_um = camera["y"] + (rows + 0.5 - h / 2) / camera["zoom"]
    x_um = camera["x"] + (cols + 0.5 - w / 2) / camera["zoom"] + shift_um
    iy, ix = np.floor(y_um / mpp).astype(int), np.floor(x_um / mpp).astype(int)
    inside = (iy >= 0) & (iy < labels.shape[0]) & (ix >= 0) & (ix < labels.shape[1])
    edges = ndi.binary_dilation(find_boundaries(labels, mode="inner"), iterations=2)
    return int(yellow.sum()), float(edges[iy[inside], ix[inside]].mean())


def test_readme_screenshot_shows_he_with_nuclei_outlines_on_the_nuclei(view_run):
    out, png, res = view_run
    assert res.returncode == 0, res.stderr[-3000:]
    _, camera = parse(res.stdout)
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[:2] == (int(camera["h"]), int(camera["w"]))
    assert img.std() > 30  # not blank: H&E purple and pink, not one flat colour (black = no GL)
    # Eosin pink / haematoxylin purple: red and blue over green, on much of the picture.
    r, g, b = (img[..., i].astype(int) for i in range(3))
    assert ((r - g > 40) & (b - g > 20)).mean() > 0.2
    root = zarr.open_group(str(out / SID / "masks.ome.zarr"), mode="r")
    labels = np.asarray(root["labels/nuclei/0"])
    mpp = root["labels/nuclei"].attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"][-1]
    n, on_edges = outline_hits(png, camera, labels, mpp)
    assert n > 0.005 * img.shape[0] * img.shape[1], f"only {n} outline pixels"
    assert on_edges > 0.9, f"{on_edges:.1%} of the outline pixels lie on nucleus boundaries"
    _, shifted = outline_hits(png, camera, labels, mpp, shift_um=4.0)  # about half a nucleus
    assert shifted < on_edges - 0.3, (on_edges, shifted)


def test_moved_slide_names_the_path_and_offers_slide_option(readme_run, tmp_path, cmu_slide, tcga_slide):
    out, _ = readme_run
    moved = tmp_path / SID
    shutil.copytree(out / SID, moved)
    run = json.loads((moved / "run.json").read_text())
    gone = tmp_path / "gone" / "CMU-1-Small-Region.svs"
    (moved / "run.json").write_text(json.dumps({**run, "path": str(gone)}))
    res = subprocess.run([str(CLI), "view", str(moved), "--screenshot", str(tmp_path / "x.png")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and str(gone) in res.stderr and "--slide PATH" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()
    # Another slide given as --slide: refused by fingerprint, naming it.
    res = subprocess.run([str(CLI), "view", str(moved), "--slide", str(tcga_slide), "--screenshot",
                          str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "not the slide segmented" in res.stderr and str(tcga_slide) in res.stderr


def test_batch_folder_and_missing_napari_are_one_line_exit_2(readme_run, tmp_path):
    out, _ = readme_run
    res = subprocess.run([str(CLI), "view", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "a batch folder" in res.stderr and SID in res.stderr, res.stderr
    # napari absent (as without the extra): sys.modules[name] = None makes its import fail.
    code = ("import sys; sys.modules['napari'] = None; sys.argv = ['nucleiflow', 'view', sys.argv[1]]; "
            "from nucleiflow.flows.cli import app; app()")
    res = subprocess.run([sys.executable, "-c", code, str(out / SID)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "pip install -e '.[viewer]'" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_cli_import_does_not_load_napari():
    code = "import sys, nucleiflow.flows.cli; print(sorted(m for m in ('napari', 'qtpy', 'PyQt6') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


def test_framing_fits_the_slide_then_zooms_around_the_centre():
    # A 1000 x 2000 um slide on a 900 x 1200 px canvas: width-bound, 0.6 px/um * 0.95.
    centre, zoom = framing((1000.0, 2000.0), (900, 1200))
    assert centre == (500.0, 1000.0) and zoom == pytest.approx(0.95 * 0.6)
    centre, zoom6 = framing((1000.0, 2000.0), (900, 1200), 6, centre=(100.0, 200.0))
    assert centre == (100.0, 200.0) and zoom6 == pytest.approx(6 * zoom)
    with pytest.raises(ValueError):
        framing((1.0, 1.0), (10, 10), 0.5)
