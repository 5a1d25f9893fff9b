"""Redraw ``sample.png``, the demo's default image: a flat-colour 336x336 scene (PIL only).

Run ``python zspaprune_ops/assets/make_sample.py`` to regenerate it; the drawing is
deterministic, so the committed file only changes when this script does.
"""
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 336  # LLaVA-1.5's input size: a 24x24 grid of 14-pixel patches


def draw_sample() -> Image.Image:
    """A house, a tree, the sun and a ball on a lawn: RGB, SIZE x SIZE."""
    image = Image.new("RGB", (SIZE, SIZE), (135, 196, 235))  # sky
    draw = ImageDraw.Draw(image)
    draw.ellipse((250, 24, 310, 84), fill=(255, 214, 64))  # sun
    draw.rectangle((0, 230, SIZE, SIZE), fill=(88, 170, 72))  # lawn
    draw.polygon([(40, 150), (120, 90), (200, 150)], fill=(120, 72, 40))  # roof
    draw.rectangle((55, 150, 185, 250), fill=(200, 50, 45))  # house
    draw.rectangle((105, 195, 135, 250), fill=(90, 55, 30))  # door
    for left in (68, 150):
        draw.rectangle((left, 165, left + 22, 187), fill=(240, 240, 250))  # windows
    draw.rectangle((252, 170, 266, 262), fill=(110, 75, 45))  # trunk
    draw.ellipse((220, 110, 298, 190), fill=(40, 120, 50))  # crown
    draw.ellipse((200, 280, 232, 312), fill=(30, 90, 210))  # ball
    return image


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "sample.png"
    draw_sample().save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
