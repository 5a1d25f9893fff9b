"""The table and the plot of ``zspaprune eval``'s rows (``run.rows``)."""
import math
from typing import List, Tuple

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def table(rows: List[dict], markdown: bool = False) -> str:
    """One line per method, one column per budget: ``accuracy% (agreement%)``; then the unpruned
    accuracy with its 95% interval. Plain text, or a Markdown table."""
    unpruned = rows[0]
    budgets = list(dict.fromkeys(r["shape"]["budget"] for r in rows[1:]))
    keeps = {r["shape"]["budget"]: r["keep"] for r in rows[1:]}
    cell = {(r["method"], r["shape"]["budget"]): r for r in rows[1:]}
    grid = [["method", *(budget_label(b, keeps[b]) for b in budgets)]]
    for method in dict.fromkeys(r["method"] for r in rows[1:]):
        grid.append([method, *(_percent(cell[method, b]) for b in budgets)])
    if markdown:
        lines = ["| " + " | ".join(line) + " |" for line in grid]
        lines.insert(1, "|---" * len(grid[0]) + "|")
    else:
        width = max(len(line[0]) for line in grid) + 2
        lines = [f"{line[0]:<{width}}" + "".join(f"{c:>18}" for c in line[1:]) for line in grid]
    low, high = unpruned["ci95"]
    shape = unpruned["shape"]
    lines += ["", f"{shape['model']} on {shape['data']}: accuracy % (agreement with the "
                  f"unpruned answer %) over "
                  f"{unpruned['shape']['questions']} questions; unpruned "
                  f"({unpruned['keep']:g} tokens): {unpruned['accuracy']:.1%} "
                  f"[{low:.1%}, {high:.1%}] (95% Wilson interval)."]
    return "\n".join(lines)


def paired_difference(first: str, second: str, z: float = 1.96) -> Tuple[float, float, int, int]:
    """Two methods' per-question outcomes (``"0"``/``"1"`` strings, one character a question, the
    same questions in order): (mean of first - second, half-width of its normal 95% interval,
    questions only the first got right, only the second)."""
    if len(first) != len(second) or not first:
        raise ValueError(f"paired outcomes must be non-empty and of one length, got "
                         f"{len(first)} and {len(second)}")
    diffs = [int(a) - int(b) for a, b in zip(first, second)]
    n, mean = len(diffs), sum(diffs) / len(diffs)
    variance = sum((d - mean) ** 2 for d in diffs) / max(1, n - 1)
    return mean, z * math.sqrt(variance / n), diffs.count(1), diffs.count(-1)


def paired_cell(first: str, second: str) -> str:
    """``+2.4 ± 3.1 (30/18)``: ``paired_difference`` in points, the discordant counts."""
    mean, half, only_first, only_second = paired_difference(first, second)
    return f"{mean * 100:+.1f} ± {half * 100:.1f} ({only_first}/{only_second})"


def paired_table(rows: List[dict], baseline: str = "ratio 0 (DivPrune)") -> str:
    """Markdown: per budget, each method's accuracy minus ``baseline``'s on the same questions,
    in points, with a 95% interval and (questions only the method got right / only the
    baseline); empty where ``baseline`` was not run."""
    cell = {(r["method"], r["shape"]["budget"]): r for r in rows[1:]}
    budgets = list(dict.fromkeys(r["shape"]["budget"] for r in rows[1:]))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows[1:]) if m != baseline]
    if not any(m == baseline for m, _ in cell) or not methods:
        return ""
    lines = ["| kept tokens | " + " | ".join(f"{m} - {baseline}" for m in methods) + " |",
             "|---" * (len(methods) + 1) + "|"]
    for b in budgets:
        base = cell[baseline, b]
        cells = [paired_cell(cell[m, b]["right"], base["right"]) for m in methods]
        lines.append(f"| {budget_label(b, base['keep'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budget_label(budget, keep: float) -> str:
    """A budget column's title: ``50% (128 tokens)`` for a share, ``64 tokens`` for a count."""
    if isinstance(budget, int):
        return f"{keep:g} tokens"
    return f"{budget:.0%} ({keep:g} tokens)"


def _percent(row: dict) -> str:
    return f"{row['accuracy'] * 100:.1f} ({row['agreement'] * 100:.0f})"


def plot(rows: List[dict], title: str, size=(900, 560)) -> Image.Image:
    """Accuracy against kept tokens (log scale), one line per method, the unpruned accuracy as
    a dashed line; 95% intervals as whiskers."""
    width, height = size
    left, right, top, bottom = 70, 230, 40, 60
    figure = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(figure)
    font = _font(13)
    keeps = sorted({r["keep"] for r in rows})
    low_k, high_k = min(keeps) / 1.3, max(keeps) * 1.3

    def x(keep):
        span = math.log(high_k) - math.log(low_k)
        return left + (math.log(keep) - math.log(low_k)) / span * (width - left - right)

    def y(accuracy):
        return top + (1 - accuracy) * (height - top - bottom)

    for tick in range(0, 101, 20):  # axes and grid
        draw.line((left, y(tick / 100), width - right, y(tick / 100)), fill=(225, 225, 225))
        draw.text((left - 8, y(tick / 100)), f"{tick}%", fill=(0, 0, 0), font=font, anchor="rm")
    for keep in keeps:
        draw.line((x(keep), top, x(keep), height - bottom), fill=(235, 235, 235))
        draw.text((x(keep), height - bottom + 8), f"{keep:g}", fill=(0, 0, 0), font=font,
                  anchor="mt")
    draw.rectangle((left, top, width - right, height - bottom), outline=(0, 0, 0))
    draw.text(((left + width - right) / 2, height - 22), "kept visual tokens per image (log)",
              fill=(0, 0, 0), font=font, anchor="mm")
    draw.text((left, 14), title, fill=(0, 0, 0), font=_font(15))
    unpruned = rows[0]
    draw.line((left, y(unpruned["accuracy"]), width - right, y(unpruned["accuracy"])),
              fill=(0, 0, 0), width=1)
    methods = list(dict.fromkeys(r["method"] for r in rows[1:]))
    legend = [("unpruned", (0, 0, 0))]
    for index, method in enumerate(methods):
        colour = PALETTE[index % len(PALETTE)]
        points = sorted((r["keep"], r["accuracy"], r["ci95"]) for r in rows[1:]
                        if r["method"] == method)
        draw.line([(x(k), y(a)) for k, a, _ in points], fill=colour, width=3)
        nudge = 3 * (index - (len(methods) - 1) / 2)  # whiskers side by side, not on top
        for keep, accuracy, (low, high) in points:
            draw.line((x(keep) + nudge, y(low), x(keep) + nudge, y(high)), fill=colour, width=1)
            draw.ellipse((x(keep) - 4, y(accuracy) - 4, x(keep) + 4, y(accuracy) + 4), fill=colour)
        legend.append((method, colour))
    for index, (name, colour) in enumerate(legend):
        ly = top + 10 + 22 * index
        draw.line((width - right + 15, ly, width - right + 40, ly), fill=colour, width=3)
        draw.text((width - right + 46, ly), name, fill=(0, 0, 0), font=font, anchor="lm")
    return figure


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()
