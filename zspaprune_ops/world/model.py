"""The shapes world's LLaVA: configs, word-level tokenizer, processor, and the shipped weights.

A ``LlavaForConditionalGeneration`` built from configs: a CLIP-style vision tower (224 px,
14 px patches: 256 visual tokens; its last layer feeds the projector), LLaVA's two-layer MLP
projector and a small Llama. The tokenizer has one token per word of the world (questions,
answers, chat format), so every answer is a single token.
"""
from pathlib import Path

from zspaprune_ops.world import scenes

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "shapes_llava"
"""The trained model shipped with the package (fp16 safetensors, tokenizer, processor)."""

SIZES = dict(vision_hidden=128, vision_layers=3, vision_heads=4, vision_intermediate=256,
             text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=2, intermediate=256)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
WORDS = ("USER", "ASSISTANT", ":", "?", "What", "color", "is", "the", "Which", "shape", "Is",
         "there", "a", *scenes.COLOURS, *scenes.SHAPES, "yes", "no")


def build_tokenizer():
    """A word-level tokenizer over ``WORDS`` (splits on whitespace and punctuation; decodes
    ``USER: What color is the circle? ASSISTANT:`` back as written, newlines as spaces)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate((*SPECIAL_TOKENS, *WORDS))}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    # joins words with spaces but none before "?" or ":", so that a decoded prompt reads as the
    # chat template wrote it ("USER: ... circle? ASSISTANT:") and prompt="message" finds the
    # user's words in it
    words.decoder = decoders.Sequence([decoders.WordPiece(cleanup=True),
                                       decoders.Replace(" :", ":")])
    return PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def build_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    s = SIZES
    ids = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vision = CLIPVisionConfig(
        image_size=scenes.IMAGE_SIZE, patch_size=scenes.PATCH_SIZE, hidden_size=s["vision_hidden"],
        intermediate_size=s["vision_intermediate"], num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["vision_heads"], projection_dim=s["vision_hidden"])
    text = LlamaConfig(
        hidden_size=s["text_hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
        num_key_value_heads=s["text_kv_heads"], vocab_size=len(SPECIAL_TOKENS) + len(WORDS),
        max_position_embeddings=512, pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"], tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids["<image>"],
                       image_seq_length=(scenes.IMAGE_SIZE // scenes.PATCH_SIZE) ** 2,
                       vision_feature_layer=-1, vision_feature_select_strategy="default")


CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
"""llava-hf/llava-1.5-7b-hf's chat template, verbatim (tests/data/chat_templates/llava_1_5.jinja):
shipped with the model so that ``prompt="message"`` finds the user's words in its prompts."""


def build_processor():
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = scenes.IMAGE_SIZE
    images = CLIPImageProcessorPil(size={"shortest_edge": size},
                                   crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=images, tokenizer=build_tokenizer(),
                          patch_size=scenes.PATCH_SIZE, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def build_model(seed: int = 0):
    """A freshly initialised model (Hugging Face's init, seeded), float32, train mode."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlavaForConditionalGeneration(build_config())


def chat_prompt(question: str) -> str:
    """The world's prompt format: LLaVA-1.5's, what ``CHAT_TEMPLATE`` renders for one user
    message of an image and ``question`` and the generation prompt."""
    return f"USER: <image>\n{question} ASSISTANT:"


def image_features(model, pixel_values):
    """The projected visual tokens (the language model's input) of ``pixel_values`` [B, 3, H,
    W]: [B * N, D], the model's dtype."""
    import torch

    features = model.model.get_image_features(
        pixel_values=pixel_values, vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        return_dict=True).pooler_output
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    return features.reshape(-1, features.shape[-1])
