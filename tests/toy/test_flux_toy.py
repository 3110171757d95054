"""The toy FLUX.1's parts: its T5 tokenizer (every toy word one token, loads offline as FluxPipeline names it)."""

import pytest

from conjure.toy.tokenizer import T5_MODEL_MAX_LENGTH, TOY_WORDS, toy_t5_tokenizer, write_toy_t5_tokenizer

SAMPLE = "a large red circle in the top left on a white background"


@pytest.fixture(scope="module")
def t5():
    return toy_t5_tokenizer()


def test_every_toy_word_is_one_t5_token(t5):
    ids = {w: t5(w).input_ids for w in TOY_WORDS}
    assert all(len(i) == 2 and i[1] == t5.eos_token_id for i in ids.values())
    assert len({i[0] for i in ids.values()}) == len(TOY_WORDS)  # distinct tokens
    assert t5.unk_token_id not in {i[0] for i in ids.values()}
    assert len(t5(SAMPLE).input_ids) == len(SAMPLE.split()) + 1 <= T5_MODEL_MAX_LENGTH


def test_t5_special_tokens_are_t5s_and_other_text_never_becomes_unk(t5):
    assert (t5.pad_token, t5.pad_token_id, t5.eos_token, t5.eos_token_id, t5.unk_token_id) == ("<pad>", 0, "</s>", 1, 2)
    ids = t5("A Photo, of <yellow-star> 42!").input_ids
    assert t5.unk_token_id not in ids and ids[-1] == t5.eos_token_id
    assert t5.decode(ids, skip_special_tokens=True) == "A Photo, of <yellow-star> 42!"


def test_t5_tokenizer_loads_offline_as_t5_tokenizer_fast(tmp_path, t5):
    from transformers import T5TokenizerFast

    write_toy_t5_tokenizer(tmp_path)
    loaded = T5TokenizerFast.from_pretrained(tmp_path)
    assert loaded.model_max_length == T5_MODEL_MAX_LENGTH
    batch = loaded([SAMPLE, "a star"], padding="max_length", max_length=T5_MODEL_MAX_LENGTH).input_ids
    assert batch[0] == t5(SAMPLE, padding="max_length", max_length=T5_MODEL_MAX_LENGTH).input_ids
    assert batch[1][3:] == [loaded.pad_token_id] * (T5_MODEL_MAX_LENGTH - 3)
