"""A deterministic synthetic grounding task: symbols in coloured boxes on a grid, questions about them.

Every image is a white ``rows x cols`` grid of ``cell``-pixel cells; a few cells hold an item, a
symbol (digit or letter) drawn in black on a filled box of one colour. With the default 28-pixel
cells and Qwen2-VL's 14-pixel patches merged 2x2, each cell is exactly one image token, so every
answer lives in known image tokens: a press that drops them loses the answer.

Four kinds of questions, in equal shares:

* ``position``: "What is at row 2, column 3?" -> the symbol in that cell (rows and columns from 1);
* ``colour``: "What is in the red box?" -> the symbol of the only item of that colour;
* ``count``: "How many blue boxes?" -> the number of items of that colour (possibly 0);
* ``read``: "Read all items left to right." -> every symbol in reading order (row by row, each
  row left to right), e.g. ``"7KA3"`` (the multi-token answer).

Samples depend only on ``(seed, index)``, so a set can be regenerated, extended or sliced without
changing the samples it shares with another.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

#: The symbols items may show (unique within an image, so the reading order is unambiguous).
SYMBOLS = "0123456789ACEFHKLPTX"
#: Box colours by name.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 60, 60),
    "green": (60, 180, 75),
    "blue": (80, 130, 245),
    "yellow": (240, 210, 40),
}
#: The question kinds, in the order samples cycle through them.
KINDS = ("position", "colour", "count", "read")
#: Seed of the fixed evaluation sets (training draws from other seeds).
EVAL_SEED = 1234


@dataclass(frozen=True)
class Item:
    """One symbol in a coloured box at grid cell ``(row, col)`` (0-based)."""

    row: int
    col: int
    symbol: str
    colour: str


@dataclass(frozen=True)
class GridSpec:
    """Geometry of the images and how many items they hold.

    Parameters
    ----------
    rows, cols : int, default=4
        Grid size; with ``cell=28`` the image has ``rows * cols`` Qwen2-VL image tokens.
    cell : int, default=28
        Cell side in pixels (a multiple of 28 keeps one cell per merged image token).
    min_items, max_items : int, default=3, 6
        Items per image, drawn uniformly in this range.
    """

    rows: int = 4
    cols: int = 4
    cell: int = 28
    min_items: int = 3
    max_items: int = 6

    def __post_init__(self) -> None:
        if not (1 <= self.rows <= 9 and 1 <= self.cols <= 9):
            raise ValueError(f"rows and cols must be in [1, 9], got {self.rows}x{self.cols}")
        if self.cell < 16:
            raise ValueError(f"cell must be >= 16 pixels, got {self.cell}")
        if not 1 <= self.min_items <= self.max_items <= min(self.rows * self.cols, len(SYMBOLS)):
            raise ValueError(
                f"need 1 <= min_items <= max_items <= min(cells, {len(SYMBOLS)} symbols), "
                f"got {self.min_items}..{self.max_items} on {self.rows * self.cols} cells"
            )

    @property
    def size(self) -> tuple[int, int]:
        """Image ``(width, height)`` in pixels."""
        return self.cols * self.cell, self.rows * self.cell


@dataclass
class GroundingSample:
    """One image, one question about it, and the exact answer string."""

    image: Image.Image
    question: str
    answer: str
    kind: str
    items: list[Item] = field(default_factory=list)


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow's bundled font: the same glyphs on every machine with the same Pillow.
    return ImageFont.load_default(size=size)


def render(items: Sequence[Item], grid: GridSpec) -> Image.Image:
    """Draw ``items`` on a white image of ``grid.size``."""
    image = Image.new("RGB", grid.size, "white")
    draw = ImageDraw.Draw(image)
    inset = max(1, grid.cell // 14)
    font = _font(int(grid.cell * 0.75))
    for item in items:
        x0, y0 = item.col * grid.cell, item.row * grid.cell
        draw.rectangle(
            [x0 + inset, y0 + inset, x0 + grid.cell - 1 - inset, y0 + grid.cell - 1 - inset],
            fill=COLOURS[item.colour],
        )
        draw.text((x0 + grid.cell / 2, y0 + grid.cell / 2), item.symbol, fill="black", font=font, anchor="mm")
    return image


def reading_order(items: Sequence[Item]) -> list[Item]:
    """``items`` row by row, left to right."""
    return sorted(items, key=lambda item: (item.row, item.col))


def _question(rng: random.Random, kind: str, items: list[Item]) -> tuple[str, str]:
    counts = {name: sum(item.colour == name for item in items) for name in COLOURS}
    if kind == "position":
        item = rng.choice(items)
        return f"What is at row {item.row + 1}, column {item.col + 1}?", item.symbol
    if kind == "colour":
        item = rng.choice([item for item in items if counts[item.colour] == 1])
        return f"What is in the {item.colour} box?", item.symbol
    if kind == "count":
        name = rng.choice(list(COLOURS))
        return f"How many {name} boxes?", str(counts[name])
    return "Read all items left to right.", "".join(i.symbol for i in reading_order(items))


def make_sample(
    seed: int, index: int, grid: GridSpec | None = None, kind: str | None = None
) -> GroundingSample:
    """Sample ``index`` of the stream ``seed``: a random layout and a question of ``kind``.

    Parameters
    ----------
    seed, index : int
        The sample is a pure function of both.
    grid : GridSpec, optional
        Image geometry; default ``GridSpec()`` (4x4 cells of 28 pixels: 112x112, 16 image tokens).
    kind : str, optional
        One of :data:`KINDS`; default ``KINDS[index % 4]``.
    """
    grid = grid or GridSpec()
    kind = kind or KINDS[index % len(KINDS)]
    if kind not in KINDS:
        raise ValueError(f"unknown question kind {kind!r}; choose from {', '.join(KINDS)}")
    rng = random.Random(f"mmshiftkv-grounding/{seed}/{index}")
    n_items = rng.randint(grid.min_items, grid.max_items)
    cells = rng.sample(range(grid.rows * grid.cols), n_items)
    symbols = rng.sample(SYMBOLS, n_items)
    names = list(COLOURS)
    colours = [rng.choice(names) for _ in range(n_items)]
    if kind == "colour" and all(colours.count(c) > 1 for c in colours):
        # A "colour" question needs an item whose colour is unique: recolour one with an unused colour.
        colours[0] = next(name for name in names if name not in colours)
    items = [
        Item(row=cell // grid.cols, col=cell % grid.cols, symbol=symbol, colour=colour)
        for cell, symbol, colour in zip(cells, symbols, colours)
    ]
    question, answer = _question(rng, kind, items)
    return GroundingSample(render(items, grid), question, answer, kind, items)


def make_dataset(
    n: int, seed: int = EVAL_SEED, grid: GridSpec | None = None, start: int = 0
) -> list[GroundingSample]:
    """Samples ``start .. start + n - 1`` of the stream ``seed`` (all kinds in equal shares)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [make_sample(seed, index, grid) for index in range(start, start + n)]
