from studio.models.tiny import load_clip_tokenizer


def test_committed_clip_tokenizer_is_the_real_one():
    tok = load_clip_tokenizer()
    assert len(tok) == 49408
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert tok.convert_tokens_to_ids("a</w>") == 320
    ids = tok("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_sd1_pads_with_eos_and_openclip_style_pads_with_bang():
    ids = load_clip_tokenizer()("a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[-1] == 49407
    ids2 = load_clip_tokenizer(pad_token="!")("a cat", padding="max_length", max_length=77).input_ids
    assert ids2[-1] == 0
