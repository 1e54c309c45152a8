"""A contact sheet: a grid of thumbnails, each with its name and a badge saying what is wrong.

A badge is a coloured disc in the tile's top-right corner: green "ok" when an image has no
warning, orange with the number of its warnings, red with "x" for a file that cannot be used.
Under the thumbnail: the file name and the warning codes (``blurry``, ``small``, ``duplicate``,
``converted``, ``animated``, ``rotated``, ``mask``, ``format``, ``caption``, ``error``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (245, 245, 245)
OK, WARN, ERROR = (46, 160, 67), (230, 140, 20), (210, 40, 40)
LABEL_LINES = 2
LINE_HEIGHT = 14
PAD = 8


@dataclass
class Tile:
    """One cell: a file name, its thumbnail (None for an unusable file), its warning codes."""

    name: str
    thumbnail: Image.Image | None
    flags: list[str] = field(default_factory=list)
    error: bool = False


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # an old Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    """``text`` shortened with "..." until it fits ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def draw_sheet(tiles: list[Tile], *, side: int = 128, columns: int | None = None) -> Image.Image:
    """An RGB image: ``tiles`` in a grid of ``columns`` (default: about square, at most 8) cells of
    ``side``×``side`` thumbnails plus two label lines."""
    n = max(1, len(tiles))
    cols = columns or min(8, max(1, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    cell_w, cell_h = side + 2 * PAD, side + 2 * PAD + LABEL_LINES * LINE_HEIGHT
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font, badge_font = _font(11), _font(12)
    if not tiles:
        draw.text((PAD, PAD), "no images", fill=(0, 0, 0), font=font)
    for k, tile in enumerate(tiles):
        x, y = (k % cols) * cell_w + PAD, (k // cols) * cell_h + PAD
        if tile.thumbnail is not None:
            thumb = tile.thumbnail
            ox, oy = x + (side - thumb.width) // 2, y + (side - thumb.height) // 2
            if thumb.mode == "RGBA":  # a checkerboard shows the transparent part
                board = Image.new("RGB", thumb.size, (255, 255, 255))
                bd = ImageDraw.Draw(board)
                for cy in range(0, thumb.height, 8):
                    for cx in range((cy // 8) % 2 * 8, thumb.width, 16):
                        bd.rectangle((cx, cy, cx + 7, cy + 7), fill=(210, 210, 210))
                board.paste(thumb, (0, 0), thumb)
                thumb = board
            sheet.paste(thumb.convert("RGB"), (ox, oy))
        else:
            draw.rectangle((x, y, x + side - 1, y + side - 1), fill=(225, 225, 225), outline=ERROR, width=2)
            draw.line((x + 20, y + 20, x + side - 21, y + side - 21), fill=ERROR, width=3)
            draw.line((x + 20, y + side - 21, x + side - 21, y + 20), fill=ERROR, width=3)
        count = len([f for f in tile.flags if f != "error"])
        colour, label = (ERROR, "x") if tile.error else (WARN, str(count)) if count else (OK, "ok")
        r = 11
        cx, cy = x + side - r - 2, y + r + 2
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=(255, 255, 255), width=2)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=badge_font)
        draw.text((cx - (left + right) / 2, cy - (top + bottom) / 2), label, fill=(255, 255, 255), font=badge_font)
        draw.text((x, y + side + 3), _fit(tile.name, font, side), fill=(0, 0, 0), font=font)
        codes = ", ".join(tile.flags)
        if codes:
            draw.text((x, y + side + 3 + LINE_HEIGHT), _fit(codes, font, side),
                      fill=ERROR if tile.error else WARN, font=font)
    return sheet
