"""Small PIL drawing parts the output pictures share: translucent nucleus fills, a scale
bar, a legend, a text line. PIL only (no plotting dependency on a worker)."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Nuclei on H&E are haematoxylin purple-blue on eosin pink: yellow is their complement, so a
# translucent yellow fill (and a thin yellow edge when zoomed) shows on both without hiding
# the chromatin under it the way opaque neon outlines did.
NUCLEUS = (255, 221, 0)
ZOOM_BOX = (0, 200, 255)  # the zoomed area on the whole-slide view: cyan, unlike any stain


def font(size: int = 14) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def fill_rings(img: Image.Image, rings: Iterable[np.ndarray], colour=NUCLEUS, alpha: int = 110,
               outline: bool = False) -> int:
    """Fill each closed ring ((n, 2) x, y in image px) translucently on ``img`` (RGB, in
    place), with a 1 px edge in ``colour`` when ``outline``. Returns the number drawn."""
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    n = 0
    for ring in rings:
        xy = [tuple(p) for p in np.rint(ring).astype(np.int64)]
        if len(set(xy)) < 3:  # smaller than a pixel at this scale: one dot
            draw.point(xy[0], fill=(*colour, 255 if outline else alpha + 60))
        else:
            draw.polygon(xy, fill=(*colour, alpha), outline=(*colour, 255) if outline else None)
        n += 1
    img.paste(Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB"))
    return n


def nice_length(max_value: float) -> float:
    """Largest 1, 2 or 5 x 10^k <= ``max_value``: a scale bar's round length."""
    if max_value <= 0:
        return 0.0
    k = 10.0 ** math.floor(math.log10(max_value))
    return max(m * k for m in (1, 2, 5) if m * k <= max_value)


def scale_bar(img: Image.Image, mpp: float, *, margin: int = 12) -> float:
    """A black bar of a round length (about a fifth of the width) with its length in um, on
    a white box in the bottom-left corner. Returns the length in um."""
    um = nice_length(img.width * mpp / 5)
    px = round(um / mpp)
    draw = ImageDraw.Draw(img)
    label = f"{um:g} um" if um < 1000 else f"{um / 1000:g} mm"
    f = font(13)
    tw = draw.textlength(label, font=f)
    x0, y1 = margin, img.height - margin
    draw.rectangle([x0, y1 - 34, x0 + max(px, tw) + 16, y1], fill="white", outline=(90, 90, 90))
    draw.rectangle([x0 + 8, y1 - 12, x0 + 8 + px, y1 - 7], fill="black")
    draw.text((x0 + 8, y1 - 16), label, fill="black", font=f, anchor="ls")
    return um


def legend(draw: ImageDraw.ImageDraw, x: int, y: int, items: Sequence[tuple[str, tuple, str]],
           size: int = 14) -> int:
    """Legend entries left to right from (x, y): (kind, colour, label), kind "fill" (a
    translucent swatch with an edge), "box" (an outlined square) or "line". Returns the x
    after the last entry."""
    f = font(size)
    for kind, colour, label in items:
        if kind == "fill":
            draw.rectangle([x, y - 7, x + 14, y + 7], fill=tuple(int(0.45 * c + 0.55 * 235) for c in colour),
                           outline=colour)
        elif kind == "box":
            draw.rectangle([x, y - 7, x + 14, y + 7], outline=colour, width=2)
        else:
            draw.line([x, y, x + 20, y], fill=colour, width=3)
            x += 6
        draw.text((x + 20, y), label, fill="black", font=f, anchor="lm")
        x += 20 + int(draw.textlength(label, font=f)) + 24
    return x
