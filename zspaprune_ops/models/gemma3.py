"""Gemma 3 (``Gemma3ForConditionalGeneration``): images, pan-and-scan crops, bidirectional image
attention, sliding-window layers.

Candidates of an image: its ``mm_tokens_per_image`` pooled SigLIP tokens per view (the
projector outputs). With pan-and-scan the processor writes an image as its original view then
its crops, each view its own ``<start_of_image>`` ... ``<end_of_image>`` run of placeholders,
joined by fixed text; the model receives the views flat (``pixel_values`` [views, 3, S, S]) and
no crop counts. An *item* is one image: all its views, one selection of ``keep`` tokens over
them (a view may keep few or none). The views are grouped from the processor's own text
between them (``PAN_AND_SCAN_TEXT``, read with the wrapper's tokenizer), or from ``num_crops``
(per image, as the image processor returns it) when given; without either each view is an item.
The begin/end-of-image markers and the processor's text stay.

Bidirectional image attention: Gemma 3's language model lets the tokens of one contiguous
image run attend to each other in both directions, and it learns that only from
``token_type_ids`` (1 = image token; without them it silently runs causal; Hugging Face's
``generate`` hands them over on the first step only). The wrapper builds ``token_type_ids``
for the shortened sequence (``PrunedInputs.forward_kwargs``, which ``forward`` and ``generate``
pass to the model): the kept tokens of a view stay one
contiguous run, so they attend to each other, and to nothing else, exactly as in the unpruned
model with the dropped tokens masked out.

Sliding-window layers (five of six in the real checkpoints, 1024 tokens) count the window in
sequence indices (cache slots), not in positions. Whatever ``positions`` says, a sliding layer
of the pruned run attends to the last ``sliding_window`` *kept* tokens, which reach further back
in the original text than the unpruned model's window. So the pruned run equals the unpruned
run with the dropped tokens masked out only while every sequence fits in the window; beyond
it, a sliding layer sees more. ``positions`` changes only the rotary angles: ``"compact"`` (the
default) keeps every distance a sliding layer sees below ``sliding_window``, as in training;
``"original"`` keeps the unpruned distances, which a sliding layer then sees up to the window
times the pruning factor, beyond anything it was trained on.
"""
import contextlib
from typing import List, Optional, Sequence, Tuple

import torch

from zspaprune_ops.models.base import Family, ZSPAPruneModel
from zspaprune_ops.models.sequence import (Compaction, PrunedInputs, check_text,
                                           describe_value, kept_index_rows, line_positions,
                                           merged_sequence, placeholder_runs)

PAN_AND_SCAN_TEXT = ("Here is the original image \n\n",
                     "\n\n and here are some crops to help you see better \n\n", "\n\n \n\n")
"""What transformers' ``Gemma3Processor`` (5.17 to 5.24) writes before an image's original view,
between its end and the first crop, and between two crops (without the image markers)."""


class ZSPAPruneGemma3(ZSPAPruneModel):
    """ZSPAPrune for ``Gemma3ForConditionalGeneration`` (arguments as ``ZSPAPruneModel``;
    ``positions`` defaults to ``"compact"``)."""

    families = (Family("Gemma 3", "gemma3", "Gemma3ForConditionalGeneration"),)
    inserted_text = r"Here is the original image|and here are some crops to help you see better"
    default_positions = "compact"
    visual_inputs = ("token_type_ids", "num_crops")

    def prune_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                     attention_mask: Optional[torch.Tensor] = None, *,
                     token_type_ids: Optional[torch.Tensor] = None,
                     num_crops: Optional[Sequence[int]] = None,
                     prompt_mask: Optional[torch.Tensor] = None,
                     padding_side: Optional[str] = None) -> PrunedInputs:
        """Encode the views, select ``keep`` tokens per image (its views together), build the
        shortened sequence and its ``token_type_ids``.

        Args:
            input_ids: int64 [B, L], each view a run of ``mm_tokens_per_image`` image tokens
                between ``<start_of_image>`` and ``<end_of_image>``, as the processor gives them.
            pixel_values: float [views, 3, S, S], every image's original view then its crops.
            attention_mask: [B, L], 1 = real token (default: all real).
            token_type_ids: accepted for the processor's sake; recomputed from input_ids.
            num_crops: pan-and-scan crops per image (ints, batch order), as Gemma 3's image
                processor returns them; default: read from the processor's text.
            prompt_mask: bool [B, L], True = a token of every image's prompt in its sample
                (placeholders never count). Default: the wrapper's ``prompt`` setting.
            padding_side: ``"left"`` or ``"right"`` for the shortened batch. Default: right if
                the input is right-padded, else left.
        Returns:
            ``PrunedInputs``; ``image_features[i]`` [views_i * mm_tokens_per_image, D] is image
            i's views in order; ``forward_kwargs["token_type_ids"]`` int64 [B, L'].
        """
        return self._prune(input_ids, pixel_values, attention_mask, prompt_mask, padding_side,
                           token_type_ids=token_type_ids, num_crops=num_crops)[0]

    def _prune(self, input_ids, pixel_values, attention_mask, prompt_mask, padding_side,
               token_type_ids=None, num_crops=None) -> Tuple[PrunedInputs, Compaction]:
        """``prune_inputs``, and the compaction it applied."""
        attention_mask, prompt_mask, padding_side = check_text(input_ids, attention_mask,
                                                               prompt_mask, padding_side)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError("pixel_values must be a [views, 3, S, S] tensor, got "
                             f"{describe_value(pixel_values)}")
        placeholders = input_ids == self.model.config.image_token_id
        # placeholder ids may lie outside the vocabulary; their rows are replaced by features
        embeds = self.model.get_input_embeddings()(input_ids.masked_fill(placeholders, 0))
        features, starts = self._image_features(input_ids, placeholders, pixel_values, num_crops,
                                                embeds.dtype)
        choice = self.choose(input_ids, attention_mask, prompt_mask, embeds, placeholders,
                             features, starts)
        full, keep = merged_sequence(embeds, attention_mask,
                                     [(placeholders, features, choice.kept)])
        compact = Compaction(keep, padding_side, choice.invalid)
        pruned = PrunedInputs(
            compact(full), compact.mask(), line_positions(self.positions, attention_mask, compact),
            kept_index_rows(choice.kept, self.kept_width(features), embeds.device), features)
        pruned.forward_kwargs = {"token_type_ids": compact(placeholders.long())}
        return pruned, compact

    def _image_features(self, input_ids, placeholders, pixel_values, num_crops, dtype
                        ) -> Tuple[List[torch.Tensor], List[Tuple[int, int]]]:
        """Per image, its views' projector outputs [N_i, D]; and each image's (sample, first
        position)."""
        views = self.model.get_image_features(pixel_values, return_dict=True).pooler_output
        runs = placeholder_runs(placeholders)
        per_view = views.shape[1]
        lengths = [length for _, _, length in runs]
        if len(runs) != views.shape[0] or any(n != per_view for n in lengths):
            raise ValueError(f"input_ids hold {sum(lengths)} image tokens in runs of {lengths} but "
                             f"pixel_values give {views.shape[0]} views of {per_view} tokens; "
                             "process text and images together")
        groups = self._views_per_image(input_ids, runs, num_crops)
        features = list(views.to(dtype).flatten(0, 1).split([n * per_view for n in groups]))
        firsts, starts = 0, []
        for count in groups:
            starts.append(runs[firsts][:2])
            firsts += count
        return features, starts

    def _views_per_image(self, input_ids, runs, num_crops) -> List[int]:
        """The number of views (original + crops) of each image, in batch order."""
        if num_crops is not None:
            counts = [1 + int(n) for n in num_crops]
            if sum(counts) != len(runs):
                raise ValueError(f"num_crops {list(num_crops)} gives {sum(counts)} views but "
                                 f"input_ids hold {len(runs)}")
            return counts
        tokenizer = getattr(self.layout, "tokenizer", None)
        if tokenizer is None:
            return [1] * len(runs)
        config = self.model.config
        ids = input_ids.tolist()

        def text(sample, start, end):
            return tokenizer.decode(ids[sample][start:end], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)

        before, first_gap, next_gap = PAN_AND_SCAN_TEXT
        counts, cropped = [], False
        for k, (sample, start, length) in enumerate(runs):
            if counts and cropped and runs[k - 1][0] == sample:
                _, prev_start, prev_length = runs[k - 1]
                end = prev_start + prev_length
                joined = (ids[sample][end] == config.eoi_token_id
                          and ids[sample][start - 1] == config.boi_token_id
                          and text(sample, end + 1, start - 1) == (first_gap if counts[-1] == 1
                                                                    else next_gap))
                if joined:
                    counts[-1] += 1
                    continue
            counts.append(1)
            opening = text(sample, max(0, start - 1 - 2 * len(before)), start - 1)
            cropped = start > 0 and ids[sample][start - 1] == config.boi_token_id and \
                opening.endswith(before)
        return counts

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 prompt_mask: Optional[torch.Tensor] = None, **kwargs):
        """As ``ZSPAPruneModel.generate``. Gemma 3's ``generate`` refuses ``inputs_embeds`` (its
        ``prepare_inputs_for_generation`` does not name them; transformers 5.17 and 5.24), so
        it runs on the shortened token ids, with the shortened sequence's ``token_type_ids``,
        and the pruned embeddings replace the language model's input embeddings wherever a
        call covers the whole shortened prompt (the prefill)."""
        if pixel_values is None:
            return super().generate(input_ids, None, attention_mask, prompt_mask, **kwargs)
        visual = self._split_visual(kwargs)
        pruned, compact = self._prune(input_ids, pixel_values, attention_mask, prompt_mask,
                                      "left", **visual)
        short_ids = compact(input_ids, fill=self.model.config.text_config.pad_token_id or 0)
        with _prompt_embeddings(self.model.model.language_model, pruned.inputs_embeds):
            out = self.model.generate(input_ids=short_ids, attention_mask=pruned.attention_mask,
                                      position_ids=pruned.position_ids, **pruned.forward_kwargs,
                                      **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        sequences = torch.cat([input_ids, sequences[:, short_ids.shape[1]:].to(input_ids.dtype)],
                              dim=1)
        if isinstance(out, torch.Tensor):
            return sequences
        out.sequences = sequences
        out.kept_indices = pruned.kept_indices
        out.kept_video_indices = pruned.kept_video_indices
        return out


@contextlib.contextmanager
def _prompt_embeddings(language_model: torch.nn.Module, embeds: torch.Tensor):
    """While active, the first ``embeds.shape[1]`` input embeddings of every call of
    ``language_model`` that covers at least that many tokens are ``embeds`` [B, L', D]."""
    length = embeds.shape[1]

    def replace(module, args, kwargs):
        current = kwargs.get("inputs_embeds")
        if current is None or current.shape[1] < length:
            return None
        return args, {**kwargs, "inputs_embeds": torch.cat(
            [embeds.to(current), current[:, length:]], dim=1)}

    handle = language_model.register_forward_pre_hook(replace, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


__all__ = ["ZSPAPruneGemma3", "PAN_AND_SCAN_TEXT"]
