"""``zspaprune_ops.processors.load_processor``: every family's processor loads from a checkpoint
folder, without torchvision too, and gives what the family's processor gives."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from zspaprune_ops.processors import load_processor, without_video  # noqa: E402
from zspaprune_ops.testing import tiny_gemma3, tiny_internvl, tiny_onevision  # noqa: E402

BUILDERS = {"llava_onevision": (tiny_onevision, tiny_onevision.build_tiny_onevision),
            "internvl": (tiny_internvl, tiny_internvl.build_tiny_internvl)}
MESSAGE = [{"role": "user", "content": [{"type": "image"},
                                        {"type": "text", "text": "Where is the cat?"}]}]


def torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - absent, or PyPI's CUDA build beside a CPU torch
        return False


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {family: Path(build(tmp_path_factory.mktemp(family)))
            for family, (_, build) in BUILDERS.items()}


def picture(height=40, width=70, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def encode(processor):
    text = processor.apply_chat_template(MESSAGE, add_generation_prompt=True)
    return processor(images=[picture()], text=[text], return_tensors="pt")


def assert_same_inputs(got, expected):
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_processors_with_a_video_processor_load_without_torchvision(folders, family):
    """OneVision's and InternVL's processors need torchvision even for images; without it the
    same class loads without its video processor and encodes as the family's processor does."""
    from transformers import AutoConfig

    processor = load_processor(folders[family])
    config = AutoConfig.from_pretrained(folders[family])
    real = BUILDERS[family][0].build_processor(config)  # the builder's, made in memory
    assert type(processor).__name__ == type(real).__name__ and isinstance(processor, type(real))
    assert config.model_type == family and processor.chat_template == real.chat_template
    if torchvision_imports():
        assert processor.video_processor is not None
        return
    assert processor.video_processor is None
    assert type(processor.image_processor).__name__.endswith("Pil")
    assert_same_inputs(encode(processor), encode(real))


def test_a_checkpoint_as_the_hub_lays_it_out_loads(folders, tmp_path):
    """InternVL3-hf's files: the image processor named ``GotOcr2ImageProcessorFast`` (a
    torchvision class) with a few more settings, the chat template in ``chat_template.json``,
    no ``processor_class``: the PIL processor, the template and the same inputs."""
    if torchvision_imports():
        pytest.skip("torchvision imports here: AutoProcessor loads the checkpoint")
    folder = shutil.copytree(folders["internvl"], tmp_path / "hub")
    images = json.loads((folder / "preprocessor_config.json").read_text())
    images.update(image_processor_type="GotOcr2ImageProcessorFast", data_format="channels_first",
                  processor_class="InternVLProcessor", default_to_square=True, device=None)
    (folder / "preprocessor_config.json").write_text(json.dumps(images))
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    settings = json.loads((folder / "processor_config.json").read_text())
    del settings["processor_class"]
    (folder / "processor_config.json").write_text(json.dumps(settings))

    processor = load_processor(folder)
    assert processor.chat_template == template
    assert_same_inputs(encode(processor), encode(load_processor(folders["internvl"])))


def test_gemma3_and_failures_other_than_torchvision(tmp_path):
    """Gemma 3's processor needs no torchvision: AutoProcessor's. A folder that is no
    checkpoint fails as AutoProcessor fails."""
    folder = tiny_gemma3.build_tiny_gemma3(tmp_path / "gemma3")
    assert type(load_processor(folder)).__name__ == "Gemma3Processor"
    with pytest.raises(OSError):
        load_processor(tmp_path / "empty")


def test_without_video_takes_processed_frames_and_keeps_the_class_check():
    """Videos reach a processor without a video processor as processed frames; its other parts
    are still checked."""
    from transformers import LlavaOnevisionProcessor

    config = tiny_onevision.build_config()
    processor = tiny_onevision.build_processor(config)
    frames = torch.randn(2, 3, 32, 32)
    text = "<|im_start|>user\n<video>\nDescribe the video.<|im_end|>\n"
    out = processor(videos=[frames], text=[text], return_tensors="pt")
    assert torch.equal(out["pixel_values_videos"], frames[None])
    pooled = 2 * 2 * 2  # 2 frames of 4x4 patches pooled 2x2
    assert int((out["input_ids"] == config.video_token_id).sum()) == pooled + 1  # + newline
    with pytest.raises(TypeError, match="image_processor"):
        without_video(LlavaOnevisionProcessor)(image_processor=processor.tokenizer,
                                               tokenizer=processor.tokenizer, video_processor=None)
