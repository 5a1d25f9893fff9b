"""Draw which visual tokens a budget kept, on the image the model saw (PIL only).

A ``TokenGrid`` maps a span of an image's token sequence to a grid of boxes on the image
(``zspaprune_ops.demo.grids.token_grids`` builds them per family); grids of one name form a
*view* (LLaVA-NeXT's base grid, InternVL's tiles, Gemma 3's crops). ``draw_overlay`` renders
one panel per (view, budget): kept patches framed in the core or fill colour, dropped ones
dimmed, each panel titled with its budget and the answer given at it, under header lines (the
question, the unpruned answer).
"""
from dataclasses import dataclass
from typing import List, Sequence

from PIL import Image, ImageDraw, ImageFont

CORE_COLOUR = (255, 140, 0)  # relevance core: orange
FILL_COLOUR = (0, 200, 255)  # diversity fill: cyan
PANEL = 336  # panel side in pixels
LINE = 18  # height of one line of text
TITLE = 22  # title strip height: one line above each panel, plus LINE for an answer
GAP = 8  # space between panels
LEGEND = 26  # legend strip height
LEGEND_WIDTH = 440  # the figure is at least this wide, so the legend fits
DIM = 0.35  # brightness kept for dropped patches
BORDER = 2  # frame width around a kept patch


@dataclass(frozen=True)
class TokenGrid:
    """Tokens ``offset + r * row_stride + c`` (r < rows, c < cols) tile ``box`` row-major.

    ``box`` = (left, top, right, bottom) in original-image pixels; ``row_stride`` > ``cols``
    skips tokens that are not patches (LLaVA-NeXT's image-newline token ending each row).
    ``name`` is the view the grid belongs to (one row of panels per view).
    """

    name: str
    box: tuple
    rows: int
    cols: int
    offset: int = 0
    row_stride: int = 0

    def cell(self, token: int):
        """(row, col) of ``token`` in this grid, or None if it is not one of its patches."""
        stride = self.row_stride or self.cols
        local = token - self.offset
        row, col = divmod(local, stride)
        if local < 0 or row >= self.rows or col >= self.cols:
            return None
        return row, col


@dataclass(frozen=True)
class Budget:
    """One panel's content: the kept token indices of one image and its relevance core, a
    label and the answer the model gave at this budget ("" for none)."""

    label: str
    kept: Sequence[int]
    core: Sequence[int]
    answer: str = ""


@dataclass(frozen=True)
class Layout:
    """Where panels go: one row per view, one column per budget, below ``header_lines`` lines of
    text and a legend strip; each panel under a title of ``title_lines`` lines.

    Every panel shows ``box`` (the box all views cover) at ``PANEL`` pixels on the longer side.
    """

    box: tuple
    n_views: int
    n_budgets: int
    header_lines: int = 0
    title_lines: int = 1

    @property
    def top(self) -> int:
        """Height of the header and legend, above the first row of panels."""
        return self.header_lines * LINE + LEGEND

    @property
    def title(self) -> int:
        return TITLE + (self.title_lines - 1) * LINE

    @property
    def panel(self) -> tuple:
        """(width, height) of a panel's image area."""
        width, height = self.box[2] - self.box[0], self.box[3] - self.box[1]
        scale = PANEL / max(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    @property
    def size(self) -> tuple:
        width, height = self.panel
        return (max(LEGEND_WIDTH, GAP + self.n_budgets * (width + GAP)),
                self.top + self.n_views * (self.title + height + GAP))

    def origin(self, view_index: int, budget_index: int) -> tuple:
        """Top-left pixel of a panel's image area in the figure."""
        width, height = self.panel
        return (GAP + budget_index * (width + GAP),
                self.top + view_index * (self.title + height + GAP) + self.title)

    def cell_box(self, grid: TokenGrid, row: int, col: int) -> tuple:
        """Pixel box (left, top, right, bottom) of a grid cell inside a panel."""
        width, height = self.panel
        scale_x = width / (self.box[2] - self.box[0])
        scale_y = height / (self.box[3] - self.box[1])
        left, top = (grid.box[0] - self.box[0]) * scale_x, (grid.box[1] - self.box[1]) * scale_y
        cell_w = (grid.box[2] - grid.box[0]) * scale_x / grid.cols
        cell_h = (grid.box[3] - grid.box[1]) * scale_y / grid.rows
        return (round(left + col * cell_w), round(top + row * cell_h),
                round(left + (col + 1) * cell_w), round(top + (row + 1) * cell_h))


def views(grids: Sequence[TokenGrid]) -> List[List[TokenGrid]]:
    """The grids grouped by name (each group a view), in order of first appearance."""
    groups = {}
    for grid in grids:
        groups.setdefault(grid.name, []).append(grid)
    return list(groups.values())


def view_box(grids: Sequence[TokenGrid]) -> tuple:
    """The box the grids cover together."""
    return (min(g.box[0] for g in grids), min(g.box[1] for g in grids),
            max(g.box[2] for g in grids), max(g.box[3] for g in grids))


def draw_overlay(image: Image.Image, grids: Sequence[TokenGrid], budgets: Sequence[Budget],
                 header: Sequence[str] = ()) -> Image.Image:
    """The figure (RGB): ``header`` lines (e.g. the question), the legend, then one row of
    panels per view (``views``), one column per budget, each titled with its label and answer;
    every view must cover the same box of ``image`` (LLaVA-1.5's crop; the whole image for the
    other families' views). Text too wide for the figure or its panel is cut, ending in
    "..."."""
    grouped = views(grids)
    if len({view_box(view) for view in grouped}) != 1:
        raise ValueError("all views must cover the same image box")
    layout = figure_layout(grids, budgets, header)
    figure = Image.new("RGB", layout.size, (255, 255, 255))
    draw = ImageDraw.Draw(figure)
    font = _font()
    for index, line in enumerate(header):
        draw.text((GAP, 3 + index * LINE), _fit(line, layout.size[0] - 2 * GAP, font),
                  fill=(0, 0, 0), font=font)
    _draw_legend(draw, font, layout.header_lines * LINE)
    picture = image.convert("RGB").crop(layout.box).resize(layout.panel, Image.BICUBIC)
    dimmed = picture.point(lambda value: int(value * DIM))
    for v, view_grids in enumerate(grouped):
        for b, budget in enumerate(budgets):
            panel = dimmed.copy()
            boxes = {layout.cell_box(grid, row, col): in_core for grid in view_grids
                     for (row, col), in_core in _kept_cells(grid, budget).items()}
            for box in boxes:
                panel.paste(picture.crop(box), box[:2])
            panel_draw = ImageDraw.Draw(panel)
            for box, in_core in boxes.items():
                panel_draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), width=BORDER,
                                     outline=CORE_COLOUR if in_core else FILL_COLOUR)
            left, top = layout.origin(v, b)
            figure.paste(panel, (left, top))
            name = view_grids[0].name
            title = f"{budget.label} · {name}" if len(grouped) > 1 and name else budget.label
            lines = [title] + ([budget.answer] if layout.title_lines > 1 else [])
            for index, line in enumerate(lines):
                draw.text((left, top - layout.title + 3 + index * LINE),
                          _fit(line, layout.panel[0], font), fill=(0, 0, 0), font=font)
    return figure


def figure_layout(grids: Sequence[TokenGrid], budgets: Sequence[Budget],
                  header: Sequence[str] = ()) -> Layout:
    """The ``Layout`` ``draw_overlay`` uses: a second title line where any budget has an
    answer."""
    answers = any(budget.answer for budget in budgets)
    grouped = views(grids)
    return Layout(view_box(grouped[0]), len(grouped), len(budgets), len(header),
                  2 if answers else 1)


def _fit(text: str, width: int, font) -> str:
    """``text``, cut to ``width`` pixels with "..." if longer."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _kept_cells(grid: TokenGrid, budget: Budget) -> dict:
    """{(row, col): in_core} for the kept tokens that are patches of ``grid``."""
    core = set(budget.core)
    cells = {}
    for token in budget.kept:
        cell = grid.cell(token)
        if cell is not None:
            cells[cell] = token in core
    return cells


def _draw_legend(draw, font, top: int) -> None:
    x = GAP
    for colour, text in ((CORE_COLOUR, "relevance core"), (FILL_COLOUR, "diversity fill")):
        draw.rectangle((x, top + 7, x + 12, top + 19), outline=colour, width=BORDER + 1)
        draw.text((x + 18, top + 5), text, fill=(0, 0, 0), font=font)
        x += 150
    draw.text((x, top + 5), "dimmed = pruned", fill=(0, 0, 0), font=font)


def _font():
    try:
        return ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()
