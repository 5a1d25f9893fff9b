"""Qwen inputs without torchvision: ``QwenImageProcessor`` gives what transformers' Qwen
processor gives (compared where torchvision imports), and the commands load it where it does
not."""
import importlib.util

import pytest
import torch

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from zspaprune_ops.checkpoint import SAMPLE_IMAGE  # noqa: E402
from zspaprune_ops.processors import load_processor  # noqa: E402
from zspaprune_ops.qwen_processor import QwenImageProcessor  # noqa: E402
from zspaprune_ops.testing.tiny_qwen import IMAGE_PAD, build_tiny_qwen  # noqa: E402


def torchvision_imports() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - e.g. PyPI's CUDA build beside a CPU torch
        return False


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def folder(request, tmp_path_factory):
    return build_tiny_qwen(tmp_path_factory.mktemp(request.param), request.param, seed=4)


def conversations():
    one = [{"role": "user", "content": [{"type": "image"},
                                        {"type": "text", "text": "Describe this image."}]}]
    two = [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"},
                                        {"type": "image"},
                                        {"type": "text", "text": "Where is the cat?"}]}]
    return one, two


IMAGES = [Image.open(SAMPLE_IMAGE).convert("RGB"), Image.new("RGB", (40, 56), "orange"),
          Image.new("RGB", (90, 30), "blue")]


@pytest.mark.parametrize("side", ["left", "right"])
def test_placeholders_expand_to_each_images_tokens(folder, side):
    processor = QwenImageProcessor.from_pretrained(folder)
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations()]
    assert texts[0].count("<|image_pad|>") == 1 and texts[1].count("<|image_pad|>") == 2
    out = processor(images=IMAGES, text=texts, return_tensors="pt", padding=True,
                    padding_side=side)
    per_image = (out["image_grid_thw"].prod(-1) // 4).tolist()  # 2x2 merge
    assert out["image_grid_thw"].shape == (3, 3)
    is_image = out["input_ids"] == IMAGE_PAD
    assert is_image.sum(1).tolist() == [per_image[0], per_image[1] + per_image[2]]
    assert torch.equal(out["mm_token_type_ids"], is_image.long())
    assert out["pixel_values"].shape[0] == out["image_grid_thw"].prod(-1).sum()
    padded = out["attention_mask"][0] == 0  # the shorter sample is padded on ``side``
    assert padded.any() and bool(padded[0] if side == "left" else padded[-1])


def test_wrong_placeholder_counts_and_videos_are_errors(folder):
    processor = QwenImageProcessor.from_pretrained(folder)
    text = processor.apply_chat_template(conversations()[0], add_generation_prompt=True)
    with pytest.raises(ValueError, match="1 '<\\|image_pad\\|>' placeholder\\(s\\) for 2 image"):
        processor(images=IMAGES[:2], text=text)
    with pytest.raises(ValueError, match="no images were given"):
        processor(text=text)
    with pytest.raises(ValueError, match="videos need"):
        processor(text=text, images=IMAGES[:1], videos=[object()])


def test_equals_transformers_processor_where_torchvision_imports(folder):
    if not torchvision_imports():
        pytest.skip("torchvision does not import here: nothing to compare with")
    from transformers import AutoProcessor

    real, mine = AutoProcessor.from_pretrained(folder), QwenImageProcessor.from_pretrained(folder)
    texts = [real.apply_chat_template(c, add_generation_prompt=True) for c in conversations()]
    assert texts == [mine.apply_chat_template(c, add_generation_prompt=True)
                     for c in conversations()]
    real.tokenizer.padding_side = "left"
    expected = real(images=IMAGES, text=texts, return_tensors="pt", padding=True)
    got = mine(images=IMAGES, text=texts, return_tensors="pt", padding=True, padding_side="left")
    assert sorted(got) == sorted(expected)
    for name in expected:
        if name == "pixel_values":  # PIL vs torchvision resize: rounding only
            torch.testing.assert_close(got[name], expected[name], atol=0.05, rtol=0)
        else:
            assert torch.equal(got[name], expected[name]), name


def test_commands_load_a_qwen_processor_with_or_without_torchvision(folder):
    processor = load_processor(folder)
    assert isinstance(processor, QwenImageProcessor) == (not torchvision_imports())
    assert processor.chat_template
