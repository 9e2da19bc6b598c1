"""`nucleiflow view`: a slide's results in napari, or rendered to a PNG without a display.

Layers, bottom to top, all in micrometres (each layer's scale is its own um/px, so the
slide's levels and the masks' levels, at the model's mpp, overlay exactly):

    H&E                  the slide, read lazily level by level through the slide reader
    nucleus probability  uint8 0-255, hidden (toggle it in the layer list)
    tissue               the tissue mask, hidden
    nuclei               the label pyramid as yellow contours; the value under the
                         cursor is the nucleus_id of the table row

napari (an optional extra) is imported only inside the functions that draw. napari draws
with OpenGL in a real window: a screenshot renders on a private Xvfb server (the window
is shown there, nowhere else), which needs no display; Qt's "offscreen" platform gives
napari no usable GL context here (black pictures), so it is not used.
"""
from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from nucleiflow.pipeline.outputs.drawing import NUCLEUS
from nucleiflow.pipeline.outputs.overlays import densest_window
from nucleiflow.pipeline.outputs.results import Pyramid, SlideResults

if TYPE_CHECKING:
    import napari

INSTALL_HINT = "pip install -e '.[viewer]'"
XVFB_HINT = "apt-get install xvfb libxcb-icccm4 libxcb-keysyms1"
SCREENSHOT_PX = (900, 1200)  # (height, width) of a --screenshot PNG
FIT_MARGIN = 0.95  # the whole slide fills 95% of the canvas at --zoom 1
LAYER_NAMES = ("H&E", "nucleus probability", "tissue", "nuclei")
UNITS = ("micrometer", "micrometer")


class ViewError(Exception):
    """The view cannot be shown. The message is one line: what is missing and the fix."""


def require_napari() -> Any:
    """The napari module, or ViewError naming the extra that installs it."""
    try:
        import napari
    except ImportError as e:
        raise ViewError(f"napari is not installed ({e.name or e}); install the viewer extra: {INSTALL_HINT}") from None
    return napari


def layer_geometry(p: Pyramid) -> dict[str, tuple[float, float]]:
    """napari ``scale`` and ``translate`` (y, x um) of a pyramid's level 0. napari puts a
    pixel's centre at index * scale + translate; half a pixel puts its corner at 0 um, so
    layers of different um/px (slide vs model) share the slide's top-left corner."""
    return {"scale": (p.mpp, p.mpp), "translate": (p.mpp / 2, p.mpp / 2)}


def extent_um(p: Pyramid) -> tuple[float, float]:
    """(height, width) of level 0 in um."""
    h, w = p.levels[0].shape[:2]
    return h * p.mpp, w * p.mpp


def framing(extent: tuple[float, float], canvas_px: tuple[int, int], zoom: float = 1.0,
            centre: tuple[float, float] | None = None) -> tuple[tuple[float, float], float]:
    """Camera (centre (y, x) um, zoom in canvas px per um) showing the whole ``extent``
    (y, x um) at ``zoom`` 1, or ``zoom`` times closer around ``centre`` (default: the middle)."""
    if not zoom >= 1:
        raise ValueError(f"zoom must be >= 1, got {zoom}")
    fit = FIT_MARGIN * min(canvas_px[0] / extent[0], canvas_px[1] / extent[1])
    if centre is None or zoom == 1:
        centre = (extent[0] / 2, extent[1] / 2)
    return centre, fit * zoom


def densest_centre(results: SlideResults, field_um: float) -> tuple[float, float]:
    """(y, x) um of the centre of the ``field_um`` wide square holding the most nuclei."""
    info = results.reader.info
    size = field_um / info.mpp_x  # level-0 px
    x0, y0 = densest_window(results.parquet, info.width, info.height, size)
    return ((y0 + min(size, info.height) / 2) * info.mpp_y, (x0 + min(size, info.width) / 2) * info.mpp_x)


def camera_for(results: SlideResults, canvas_px: tuple[int, int], zoom: float) -> tuple[tuple[float, float], float]:
    """`framing` of the slide, centred on its densest nuclei when zoomed in."""
    extent = extent_um(results.he)
    _, fit = framing(extent, canvas_px)
    centre = densest_centre(results, min(canvas_px) / (fit * zoom)) if zoom > 1 else None
    return framing(extent, canvas_px, zoom, centre)


def _label_colormap(colors: dict[None | int, tuple[float, ...]]) -> Any:
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={0: (0, 0, 0, 0), **colors})


def add_layers(viewer: napari.Viewer, results: SlideResults) -> dict[str, Any]:
    """The four layers of the module docstring, in that order; returns them by name."""
    he, prob, nuclei = results.he, results.probability, results.nuclei
    layers = {
        "H&E": viewer.add_image(he.levels, multiscale=len(he.levels) > 1 or None, rgb=True, name="H&E",
                                units=UNITS, **layer_geometry(he)),
        "nucleus probability": viewer.add_image(
            prob.levels, multiscale=True, name="nucleus probability", colormap="inferno",
            contrast_limits=(0, 255), blending="additive", opacity=0.7, visible=False, units=UNITS,
            **layer_geometry(prob)),
    }
    if results.tissue is not None:
        rgba = results.label_colors.get("tissue", {}).get(1, (0, 160, 0, 96))
        layers["tissue"] = viewer.add_labels(
            results.tissue.levels, multiscale=True, name="tissue", visible=False, units=UNITS,
            colormap=_label_colormap({None: tuple(c / 255 for c in rgba)}), **layer_geometry(results.tissue))
    # One colour for every nucleus, as in nuclei_overlay.png: yellow shows on H&E purple and pink.
    layers["nuclei"] = viewer.add_labels(
        nuclei.levels, multiscale=True, name="nuclei", opacity=1.0, units=UNITS,
        colormap=_label_colormap({None: (*(c / 255 for c in NUCLEUS), 1.0)}), **layer_geometry(nuclei))
    layers["nuclei"].contour = 1
    viewer.layers.selection.active = layers["nuclei"]  # the status bar shows its nucleus_id
    viewer.scale_bar.visible = True
    rec = results.record
    viewer.title = f"nucleiflow: {rec.get('slide_id', results.slide_dir.name)} ({rec.get('nuclei', '?')} nuclei)"
    return layers


@contextmanager
def virtual_display(canvas_px: tuple[int, int], timeout_s: float = 30.0) -> Iterator[str]:
    """A private Xvfb server for the duration; yields its DISPLAY (":N", a free number
    Xvfb picks itself). ViewError when Xvfb is missing or does not start."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        raise ViewError(f"a screenshot needs Xvfb (napari draws with OpenGL in a window): {XVFB_HINT}")
    h, w = canvas_px
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([xvfb, "-displayfd", str(write_fd), "-screen", "0", f"{w + 400}x{h + 400}x24",
                             "-nolisten", "tcp"], pass_fds=(write_fd,),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], timeout_s)
        number = os.read(read_fd, 64).decode().strip() if ready else ""
        if not number:
            proc.kill()
            err = (proc.communicate(timeout=5)[1] or b"").decode(errors="replace").strip().splitlines()
            raise ViewError(f"Xvfb did not start within {timeout_s:g} s ({err[-1] if err else 'no message'})")
        yield f":{number}"
    finally:
        os.close(read_fd)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def layer_facts(layer: Any) -> dict[str, Any]:
    """Name, visibility, um/px, top-left corner and size (y, x um) of a napari layer's level 0."""
    shape = (layer.data[0] if layer.multiscale else layer.data).shape[:2]
    scale, translate = [float(v) for v in layer.scale[-2:]], [float(v) for v in layer.translate[-2:]]
    return {"name": layer.name, "type": type(layer).__name__, "visible": bool(layer.visible), "scale": scale,
            "corner_um": [t - s / 2 for t, s in zip(translate, scale)],
            "size_um": [n * s for n, s in zip(shape, scale)]}


def _new_viewer(results: SlideResults) -> tuple[Any, dict[str, Any]]:
    napari = require_napari()
    viewer = napari.Viewer(show=True, title="nucleiflow")
    return viewer, add_layers(viewer, results)


def screenshot(results: SlideResults, path: str | os.PathLike, zoom: float = 1.0,
               canvas_px: tuple[int, int] = SCREENSHOT_PX) -> dict[str, Any]:
    """Render the view to ``path`` (PNG, ``canvas_px`` (h, w)) on a private X server and
    close it. Returns what was drawn: each layer's name, visibility, scale, translate, the
    camera (for tests and the CLI's summary)."""
    require_napari()  # before starting Xvfb: the missing extra is the likelier fix
    with virtual_display(canvas_px) as display:
        # Set before Qt loads (napari is imported below): our server, through X11.
        os.environ["DISPLAY"], os.environ["QT_QPA_PLATFORM"] = display, "xcb"
        viewer, layers = _new_viewer(results)
        try:
            centre, cam_zoom = camera_for(results, canvas_px, zoom)
            viewer.camera.center, viewer.camera.zoom = centre, cam_zoom
            # size= renders at exactly these pixels with the camera above (not the window's).
            viewer.screenshot(path=str(path), size=canvas_px, canvas_only=True, flash=False)
            return {"layers": [layer_facts(lay) for lay in viewer.layers],
                    "camera": {"center": [float(c) for c in list(viewer.camera.center)[-2:]],
                               "zoom": float(viewer.camera.zoom)},
                    "canvas_px": list(canvas_px), "path": str(path)}
        finally:
            viewer.close()


def show(results: SlideResults, zoom: float = 1.0) -> None:
    """Open napari on the user's display and block until its window is closed."""
    napari = require_napari()
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise ViewError("no display to open napari on (DISPLAY is not set); render a picture instead "
                        "with --screenshot FILE.png")
    viewer, _ = _new_viewer(results)
    canvas = viewer.window._qt_viewer.canvas.size  # (h, w) px of the window's canvas
    viewer.camera.center, viewer.camera.zoom = camera_for(results, tuple(canvas), zoom)
    napari.run()


def summary(info: dict[str, Any]) -> str:
    """What a screenshot drew, for the CLI: a line per layer (shown or hidden, um/px, the
    top-left corner and size in um: equal corners and sizes = aligned) and the camera."""
    lines = [f"{lay['name']:<20} {'shown' if lay['visible'] else 'hidden':<6} {lay['scale'][-1]:.4g} um/px, "
             f"corner ({lay['corner_um'][0]:.4g}, {lay['corner_um'][1]:.4g}) um, "
             f"{lay['size_um'][0]:.1f} x {lay['size_um'][1]:.1f} um" for lay in info["layers"]]
    c = info["camera"]
    lines.append(f"camera: centre ({c['center'][0]:.2f}, {c['center'][1]:.2f}) um, zoom {c['zoom']:.5g} px/um, "
                 f"canvas {info['canvas_px'][1]}x{info['canvas_px'][0]} px")
    return "\n".join(lines)
