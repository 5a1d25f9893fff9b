"""Draw which visual tokens a budget kept, on the image the model saw (PIL only).

A ``TokenGrid`` maps a span of an image's token sequence to a grid of boxes on the image;
``token_grids`` builds them for a LLaVA-1.5, LLaVA-NeXT or Qwen config; ``draw_overlay``
renders one panel per (grid, budget): kept patches framed in the core or fill colour, dropped
ones dimmed, each panel titled with its budget and the answer given at it, under header lines
(the question, the unpruned answer).
"""
from dataclasses import dataclass
from typing import Sequence

import torch
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
    """Where panels go: one row per grid, one column per budget, below ``header_lines`` lines of
    text and a legend strip; each panel under a title of ``title_lines`` lines.

    Every panel shows its grid's box at ``PANEL`` pixels on the longer side.
    """

    box: tuple
    n_grids: int
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
                self.top + self.n_grids * (self.title + height + GAP))

    def origin(self, grid_index: int, budget_index: int) -> tuple:
        """Top-left pixel of a panel's image area in the figure."""
        width, height = self.panel
        return (GAP + budget_index * (width + GAP),
                self.top + grid_index * (self.title + height + GAP) + self.title)

    def cell_box(self, grid: TokenGrid, row: int, col: int) -> tuple:
        """Pixel box (left, top, right, bottom) of a grid cell inside a panel."""
        width, height = self.panel
        return (round(col * width / grid.cols), round(row * height / grid.rows),
                round((col + 1) * width / grid.cols), round((row + 1) * height / grid.rows))


def token_grids(config, image_processor, image_size, image_tokens: int, grid_thw=None):
    """(grids, note): where each image token sits on the original image.

    LLaVA-1.5: one grid over the processor's centre crop (the note says when it cropped the
    image). LLaVA-NeXT: the base grid (the whole
    image resized to one tile) and the high-resolution grid (the AnyRes tiles after unpadding,
    each row followed by an image-newline token, which is not drawn). Qwen2.5-VL / Qwen3-VL
    (``grid_thw``: the image's ``image_grid_thw`` row, patches of the resized image): one grid
    over the whole image, a token per merge x merge patches, in raster order.
    """
    vision = config.vision_config
    width, height = image_size
    if grid_thw is not None:
        merge = vision.spatial_merge_size
        rows, cols = int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
        if rows * cols != image_tokens:
            return [], "no grid is drawn (the image's patch grid did not match its tokens)"
        return ([TokenGrid("", (0, 0, width, height), rows, cols)],
                f"the image was resized to {int(grid_thw[2]) * vision.patch_size}x"
                f"{int(grid_thw[1]) * vision.patch_size} px; each token covers {merge}x{merge} "
                "patches")
    side = vision.image_size // vision.patch_size
    cls_offset = 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0
    if not hasattr(config, "image_grid_pinpoints"):
        box = _crop_box(width, height, image_processor)
        grid = TokenGrid("", box, side, side, cls_offset)
        notes = [] if cls_offset == 0 else ["token 0 is the CLS token (not drawn)"]
        if box != (0, 0, width, height):
            notes.append(f"the image was centre-cropped: the overlay shows the part the model "
                         f"sees, pixels {box[:2]} to {box[2:]} of the {width}x{height} image")
        return [grid], "; ".join(notes)
    whole = (0, 0, width, height)
    base = TokenGrid("base grid", whole, side, side, cls_offset)
    high_res = _anyres_shape(config, (height, width), side)
    offset = cls_offset + side * side
    if high_res is None or offset + high_res[0] * (high_res[1] + 1) != image_tokens:
        return [base], "only the base grid is drawn (the AnyRes layout did not match the tokens)"
    rows, cols = high_res
    grid = TokenGrid("high-res grid", whole, rows, cols, offset, row_stride=cols + 1)
    return [base, grid], f"image-newline tokens (one per high-res row, {rows}) are not drawn"


def _anyres_shape(config, image_hw, side: int):
    """(rows, cols) of LLaVA-NeXT's unpadded high-resolution token grid, as the model packs it."""
    try:
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape, unpad_image)
    except ImportError:
        return None
    tiles_h, tiles_w = get_anyres_image_grid_shape(list(image_hw), config.image_grid_pinpoints,
                                                   config.vision_config.image_size)
    unpadded = unpad_image(torch.empty(1, tiles_h * side, tiles_w * side), list(image_hw))
    return tuple(unpadded.shape[1:])


def _crop_box(width: int, height: int, image_processor) -> tuple:
    """The original-image pixels a CLIP-style processor keeps: resize, then centre crop."""
    size = _size_dict(getattr(image_processor, "size", None))
    crop = _size_dict(getattr(image_processor, "crop_size", None))
    scale_x = scale_y = 1.0
    if getattr(image_processor, "do_resize", True) and size.get("shortest_edge"):
        scale_x = scale_y = size["shortest_edge"] / min(width, height)
    elif getattr(image_processor, "do_resize", True) and size.get("height"):
        scale_x, scale_y = size["width"] / width, size["height"] / height
    if not (getattr(image_processor, "do_center_crop", False) and crop.get("height")):
        return (0, 0, width, height)
    left = (width * scale_x - crop["width"]) / 2 / scale_x
    top = (height * scale_y - crop["height"]) / 2 / scale_y
    return (round(left), round(top), round(left + crop["width"] / scale_x),
            round(top + crop["height"] / scale_y))


def _size_dict(size) -> dict:
    if size is None:
        return {}
    if isinstance(size, dict):
        return {k: v for k, v in size.items() if v is not None}
    return {k: getattr(size, k) for k in ("shortest_edge", "height", "width")
            if getattr(size, k, None) is not None}


def draw_overlay(image: Image.Image, grids: Sequence[TokenGrid], budgets: Sequence[Budget],
                 header: Sequence[str] = ()) -> Image.Image:
    """The figure (RGB): ``header`` lines (e.g. the question), the legend, then one row of
    panels per grid, one column per budget, each titled with its label and answer; every grid
    must cover the same box of ``image`` (true of LLaVA-1.5's crop and of LLaVA-NeXT's two
    grids). Text too wide for the figure or its panel is cut, ending in "..."."""
    if len({grid.box for grid in grids}) != 1:
        raise ValueError("all grids must cover the same image box")
    layout = figure_layout(grids, budgets, header)
    figure = Image.new("RGB", layout.size, (255, 255, 255))
    draw = ImageDraw.Draw(figure)
    font = _font()
    for index, line in enumerate(header):
        draw.text((GAP, 3 + index * LINE), _fit(line, layout.size[0] - 2 * GAP, font),
                  fill=(0, 0, 0), font=font)
    _draw_legend(draw, font, layout.header_lines * LINE)
    view = image.convert("RGB").crop(layout.box).resize(layout.panel, Image.BICUBIC)
    dimmed = view.point(lambda value: int(value * DIM))
    for g, grid in enumerate(grids):
        for b, budget in enumerate(budgets):
            panel = dimmed.copy()
            cells = _kept_cells(grid, budget)
            for (row, col) in cells:
                box = layout.cell_box(grid, row, col)
                panel.paste(view.crop(box), box[:2])
            panel_draw = ImageDraw.Draw(panel)
            for (row, col), in_core in cells.items():
                box = layout.cell_box(grid, row, col)
                panel_draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), width=BORDER,
                                     outline=CORE_COLOUR if in_core else FILL_COLOUR)
            left, top = layout.origin(g, b)
            figure.paste(panel, (left, top))
            title = f"{budget.label} · {grid.name}" if len(grids) > 1 else budget.label
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
    return Layout(grids[0].box, len(grids), len(budgets), len(header), 2 if answers else 1)


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
