"""Tiny random captioning models built from config and saved to a folder, as transformers' own tests
build theirs: BLIP, BLIP-2 (OPT) and Florence-2, each with a word-level tokenizer written to the
folder and a PIL image processor — so ``load_captioner(folder)`` runs its real loading path offline."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[EOS]", "a", "an", "photo", "of", "dog", "dogs", "cat",
         "person", "man", "on", "the", "grass", "sitting", "red", "blue", "with", "and", "in", "what", "does",
         "image", "describe", "?", "picture", "toy", "table", "is", "there"]
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_attention_heads=4,
              num_hidden_layers=2)


def _tokenizer(folder: Path, **extra):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    return BertTokenizer(str(vocab), **extra)


def write_tiny_blip(folder: Path, seed: int = 0) -> Path:
    """A tiny random ``BlipForConditionalGeneration`` + ``BlipProcessor`` (32-px images) in ``folder``."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tok = _tokenizer(folder, eos_token="[EOS]")
    config = BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, encoder_hidden_size=32, max_position_embeddings=64,
                         bos_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.convert_tokens_to_ids("[EOS]")),
        vision_config=VISION, projection_dim=16)
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).eval().save_pretrained(folder)
    BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tok).save_pretrained(folder)
    return folder


def write_tiny_blip2(folder: Path, seed: int = 0) -> Path:
    """A tiny random ``Blip2ForConditionalGeneration`` (Q-Former + OPT) + ``Blip2Processor`` in ``folder``."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tok = _tokenizer(folder, bos_token="[CLS]", eos_token="[EOS]")
    processor = Blip2Processor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tok, num_query_tokens=4)
    config = Blip2Config(
        vision_config=VISION,
        qformer_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, encoder_hidden_size=32, max_position_embeddings=64),
        text_config=dict(model_type="opt", vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=37,
                         num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64,
                         bos_token_id=tok.cls_token_id, eos_token_id=tok.convert_tokens_to_ids("[EOS]"),
                         pad_token_id=tok.pad_token_id),
        num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    Blip2ForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_tiny_florence2(folder: Path, seed: int = 0) -> Path:
    """A tiny random ``Florence2ForConditionalGeneration`` (DaViT + BART) + ``Florence2Processor`` in ``folder``."""
    from transformers import Florence2Config, Florence2ForConditionalGeneration, Florence2Processor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _tokenizer(folder, bos_token="[CLS]", eos_token="[EOS]", extra_special_tokens={"image_token": "<image>"})
    # 32 px, strides 4 then 2: 4×4 patches + 1 pooled token = 17 image tokens
    image_processor = CLIPImageProcessorPil(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                                            do_center_crop=False, image_seq_length=17)
    config = Florence2Config(
        vision_config=dict(depths=(1, 1), patch_size=(7, 3), patch_stride=(4, 2), patch_padding=(3, 1),
                           patch_prenorm=(False, True), embed_dim=(16, 32), num_heads=(2, 4), num_groups=(2, 4),
                           window_size=2, projection_dim=32, max_position_embeddings=16),
        text_config=dict(model_type="bart", vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
                         max_position_embeddings=64, bos_token_id=tok.cls_token_id,
                         eos_token_id=tok.convert_tokens_to_ids("[EOS]"), pad_token_id=tok.pad_token_id,
                         decoder_start_token_id=tok.cls_token_id),
        image_token_id=tok.image_token_id)
    torch.manual_seed(seed)
    Florence2ForConditionalGeneration(config).eval().save_pretrained(folder)
    Florence2Processor(image_processor, tok).save_pretrained(folder)
    return folder
