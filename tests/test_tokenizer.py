"""kvgen's tokenizer against transformers' `AutoTokenizer` on the same files: the same ids, text and
special tokens, whether it runs `tokenizers` directly or falls back to transformers."""

import json

import pytest
from transformers import AutoTokenizer

from kvgen.loading.tokenizer import load_tokenizer
from kvgen.testing import EOS, train_tokenizer

TEXTS = ["Hello world", " two  spaces", "naïve café, 東京 🙂", "a\n\nb\tc", f"before{EOS}after", "x" * 300]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_WITH_BOS = "{{ bos_token }}" + CHATML  # the named special tokens reach the template


@pytest.fixture
def folder(tmp_path):
    train_tokenizer(tmp_path)
    return tmp_path


def edit_config(folder, **changes):
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def assert_same(ours, reference):
    for text in TEXTS:
        ids = reference(text).input_ids
        assert ours.encode(text) == ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False
            )
    assert len(ours) == len(reference) and ours.special_tokens_map == reference.special_tokens_map
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        reference.bos_token_id,
        reference.eos_token_id,
        reference.pad_token_id,
    )


def test_a_generic_tokenizer_runs_without_transformers_and_encodes_alike(folder):
    ours = load_tokenizer(folder)
    assert ours.transformers is None and ours.backend is not None
    assert_same(ours, AutoTokenizer.from_pretrained(folder))


def test_a_chat_template_renders_alike_without_transformers_tokenizer(folder):
    edit_config(folder, chat_template=CHATML_WITH_BOS)
    ours, reference = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert ours.chat_template == CHATML_WITH_BOS
    for messages in (
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"naïve {EOS} 東京"}],
    ):
        for prompt in (True, False):
            expected = reference.apply_chat_template(messages, add_generation_prompt=prompt)["input_ids"]
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt)["input_ids"] == expected
            other = reference.apply_chat_template(messages, chat_template=CHATML, add_generation_prompt=prompt)
            assert (
                ours.apply_chat_template(messages, chat_template=CHATML, add_generation_prompt=prompt)["input_ids"]
                == other["input_ids"]
            )
    assert ours.transformers is None  # rendered by transformers' renderer, encoded here
    ours.chat_template = CHATML  # setting one goes to transformers' tokenizer, which then replaces ours
    assert ours.transformers is not None and ours.backend is None and ours.chat_template == CHATML
    assert_same(ours, reference)


@pytest.mark.parametrize(
    "change",
    [
        dict(tokenizer_class="GPT2Tokenizer"),  # a model-specific class may rebuild the pipeline
        dict(add_bos_token=True),  # the config asks for a BOS that tokenizer.json does not add
    ],
)
def test_other_tokenizers_load_through_transformers(folder, change):
    edit_config(folder, **change)
    ours = load_tokenizer(folder)
    assert ours.transformers is not None
    assert_same(ours, AutoTokenizer.from_pretrained(folder))
