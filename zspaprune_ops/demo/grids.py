"""Where each visual token of one image sits on the original image, per family: the
``TokenGrid``s the demo's overlay draws (``token_grids``).

Token indices are those of the wrapper's item (``PrunedInputs.image_features[0]`` and its
``kept_indices``): all views of the image in order, newlines included.
"""
import math

import torch

from zspaprune_ops.demo.overlay import TokenGrid


def token_grids(config, image_processor, image_size, image_tokens: int, grid_thw=None):
    """(grids, note): the grids of one image of ``image_size`` (width, height) with
    ``image_tokens`` tokens, and a note for the report ("" or what is not drawn, or why).

    - LLaVA-1.5: one grid over the processor's centre crop (the note says when it cropped).
    - LLaVA-NeXT, LLaVA-OneVision: the base grid (the whole image resized to one tile) and the
      high-resolution grid (the tiles after unpadding, OneVision's downscaled past
      ``anyres_max_N``; each row followed by an image-newline token, not drawn).
    - InternVL: its tiles (the image resized to a grid of tiles) and, with several tiles, the
      thumbnail (the whole image as one tile); each tile's tokens a grid after pixel shuffle.
    - Gemma 3: the image's view and, with pan-and-scan, its crops (side by side along the
      image's longer side).
    - Qwen2.5-VL / Qwen3-VL (``grid_thw``: the image's ``image_grid_thw`` row): one grid over the
      whole image, a token per merge x merge patches, in raster order.

    A layout that does not match ``image_tokens`` is not drawn (fewer grids, and a note).
    """
    kind = getattr(config, "model_type", "")
    if grid_thw is not None:
        return _qwen(config, image_size, image_tokens, grid_thw)
    if kind == "internvl":
        return _internvl(config, image_processor, image_size, image_tokens)
    if kind == "gemma3":
        return _gemma3(config, image_size, image_tokens)
    if kind == "llava_onevision" or hasattr(config, "image_grid_pinpoints"):
        return _anyres(config, image_size, image_tokens)
    return _llava(config, image_processor, image_size)


def _whole(image_size) -> tuple:
    return (0, 0, *image_size)


def _qwen(config, image_size, image_tokens, grid_thw):
    vision = config.vision_config
    merge = vision.spatial_merge_size
    rows, cols = int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    if rows * cols != image_tokens:
        return [], "no grid is drawn (the image's patch grid did not match its tokens)"
    return ([TokenGrid("", _whole(image_size), rows, cols)],
            f"the image was resized to {int(grid_thw[2]) * vision.patch_size}x"
            f"{int(grid_thw[1]) * vision.patch_size} px; each token covers {merge}x{merge} "
            "patches")


def _llava(config, image_processor, image_size):
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    width, height = image_size
    cls_offset = 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0
    box = _crop_box(width, height, image_processor)
    notes = [] if cls_offset == 0 else ["token 0 is the CLS token (not drawn)"]
    if box != (0, 0, width, height):
        notes.append(f"the image was centre-cropped: the overlay shows the part the model "
                     f"sees, pixels {box[:2]} to {box[2:]} of the {width}x{height} image")
    return [TokenGrid("", box, side, side, cls_offset)], "; ".join(notes)


def _anyres(config, image_size, image_tokens):
    """LLaVA-NeXT (CLIP: a CLS token with ``"full"``) and LLaVA-OneVision (SigLIP: none)."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    onevision = config.model_type == "llava_onevision"
    full = getattr(config, "vision_feature_select_strategy", "default") == "full"
    cls_offset = 1 if full and not onevision else 0
    whole = _whole(image_size)
    base = TokenGrid("base grid", whole, side, side, cls_offset)
    width, height = image_size
    high_res = _anyres_shape(config, (height, width), side, onevision)
    offset = cls_offset + side * side
    if high_res is None or offset + high_res[0] * (high_res[1] + 1) != image_tokens:
        return [base], "only the base grid is drawn (the AnyRes layout did not match the tokens)"
    rows, cols = high_res
    grid = TokenGrid("high-res grid", whole, rows, cols, offset, row_stride=cols + 1)
    return [base, grid], f"image-newline tokens (one per high-res row, {rows}) are not drawn"


def _anyres_shape(config, image_hw, side: int, onevision: bool):
    """(rows, cols) of the unpadded high-resolution token grid, as the model packs it."""
    try:
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape, unpad_image)
    except ImportError:
        return None
    tiles_h, tiles_w = get_anyres_image_grid_shape(list(image_hw), config.image_grid_pinpoints,
                                                   config.vision_config.image_size)
    rows, cols = unpad_image(torch.empty(1, tiles_h * side, tiles_w * side),
                             list(image_hw)).shape[1:]
    aspect = getattr(config, "vision_aspect_ratio", "") if onevision else ""
    if aspect.startswith("anyres_max_"):  # OneVision's downscale of a large grid
        ratio = math.sqrt(rows * cols / (int(aspect[len("anyres_max_"):]) * side ** 2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    return rows, cols


def _internvl(config, image_processor, image_size, image_tokens):
    per_tile = config.image_seq_length
    side = math.isqrt(per_tile)
    whole = _whole(image_size)
    tiles = image_tokens // per_tile
    cols, rows = 1, 1
    if getattr(image_processor, "crop_to_patches", False):
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
            get_optimal_tiled_canvas)

        tile = _size_dict(image_processor.size)
        cols, rows = get_optimal_tiled_canvas(image_size[::-1], (tile["height"], tile["width"]),
                                              image_processor.min_patches,
                                              image_processor.max_patches)
    n = rows * cols
    if side * side != per_tile or image_tokens != per_tile * (n + (n > 1)):
        return [], f"no grid is drawn ({tiles} tiles did not match the processor's tiling)"
    if n == 1:
        return [TokenGrid("", whole, side, side)], "one tile: the image resized"
    width, height = image_size
    grids = [TokenGrid("tiles", (round(c * width / cols), round(r * height / rows),
                                 round((c + 1) * width / cols), round((r + 1) * height / rows)),
                       side, side, (r * cols + c) * per_tile)
             for r in range(rows) for c in range(cols)]
    grids.append(TokenGrid("thumbnail", whole, side, side, n * per_tile))
    return grids, (f"{rows}x{cols} tiles of {per_tile} tokens, then the thumbnail (the whole "
                   "image as one tile)")


def _gemma3(config, image_size, image_tokens):
    per_view = config.mm_tokens_per_image
    side = math.isqrt(per_view)
    views = image_tokens // per_view
    whole = _whole(image_size)
    if side * side != per_view or views * per_view != image_tokens:
        return [], "no grid is drawn (the views did not match the tokens)"
    if views == 1:
        return [TokenGrid("", whole, side, side)], ""
    crops, (width, height) = views - 1, image_size
    along_width = width >= height  # pan-and-scan cuts the longer side into equal crops
    step = math.ceil((width if along_width else height) / crops)
    grids = [TokenGrid("original view", whole, side, side)]
    for k in range(crops):
        box = ((k * step, 0, min((k + 1) * step, width), height) if along_width
               else (0, k * step, width, min((k + 1) * step, height)))
        grids.append(TokenGrid("pan-and-scan crops", box, side, side, (k + 1) * per_view))
    return grids, f"the original view, then {crops} pan-and-scan crops"


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
