"""Chat: templates, sessions that keep the KV cache, and `kvgen chat` in a terminal."""

import shutil
import subprocess
import sys

import pytest

import kvgen
from kvgen.chat import PLAIN_STOPS, common_prefix, render

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def lm(gpt2_tiny):
    lm = kvgen.load(gpt2_tiny, dtype="float32")
    lm.tokenizer.chat_template = CHATML
    return lm


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_second_turn_prefills_only_new_tokens_and_equals_a_fresh_run(lm, cache):
    session = lm.chat_session(system="You are terse.", cache=cache)
    first = list(session.send("It was the best of times", 12, stop_at_eos=False))
    first_ids = render(lm, session.messages[:2], CHATML)
    assert session.last_prefill_tokens == len(first_ids)
    cached = session.cached_ids
    assert cached == first_ids + [r.token_id for r in first][:-1]

    second = list(session.send("Call me Ishmael.", 12, stop_at_eos=False))
    conversation = render(lm, session.messages[:4], CHATML)
    reused = common_prefix(cached, conversation)
    assert reused >= len(first_ids)  # the whole first turn's prompt came from the cache
    assert session.last_prefill_tokens == len(conversation) - reused < len(conversation)
    fresh = lm.generate(conversation, 12, stop_at_eos=False)
    assert [r.token_id for r in second] == fresh.token_ids
    assert session.messages[-1] == {"role": "assistant", "content": fresh.text}


def test_stopping_a_reply_keeps_it_and_the_next_turn_stays_exact(lm):
    session = lm.chat_session()
    replies = session.send("It was the best of times", 40, stop_at_eos=False)
    partial = "".join(next(replies).text for _ in range(5))
    replies.close()  # what Ctrl-C does
    assert session.messages[-1] == {"role": "assistant", "content": partial}
    second = list(session.send("Go on.", 10, stop_at_eos=False))
    fresh = lm.generate(render(lm, session.messages[:3], CHATML), 10, stop_at_eos=False)
    assert [r.token_id for r in second] == fresh.token_ids


def test_reset_forgets_the_conversation(lm):
    session = lm.chat_session(system="sys")
    list(session.send("one", 4))
    session.reset()
    assert session.messages == [{"role": "system", "content": "sys"}] and session.cached_ids == []


def test_chat_is_generate_over_the_template(lm):
    messages = [{"role": "user", "content": "Call me Ishmael."}]
    expected = lm.generate(
        lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"], 9, stop_at_eos=False
    )
    assert lm.chat(messages, 9, stop_at_eos=False).token_ids == expected.token_ids


def test_plain_transcript_without_a_template(gpt2_tiny):
    bare = kvgen.load(gpt2_tiny, dtype="float32")
    assert not bare.tokenizer.chat_template
    session = bare.chat_session()
    assert session.template is None and session.stops == PLAIN_STOPS == ["\nUser:"]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello."}]
    ids = render(bare, messages + [{"role": "user", "content": "Bye"}], None)
    assert ids == bare.encode("User: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:")  # the reply as generated


@pytest.mark.parametrize("template", [CHATML, None], ids=["template", "plain"])
def test_second_turn_prefills_exactly_its_new_tokens(gpt2_tiny, template):
    bare = kvgen.load(gpt2_tiny, dtype="float32")
    session = bare.chat_session(template=template)
    first = list(session.send("the season of Light", 8, stop_at_eos=False))
    reply = [r.token_id for r in first]
    # This greedy reply re-encodes to its own tokens (checked here, so the count below is exact).
    assert bare.tokenizer.load_transformers().encode("".join(r.text for r in first)) == reply
    first_prompt = render(bare, session.messages[:1], template)
    list(session.send("Go on.", 3, stop_at_eos=False))
    second_prompt = render(bare, session.messages[:3], template)
    assert second_prompt[: len(first_prompt) + len(reply)] == first_prompt + reply
    # New: the reply's last token (sampled, never fed) and what the template adds after it.
    assert session.last_prefill_tokens == len(second_prompt) - len(first_prompt) - len(reply) + 1


def test_prompt_ids_equal_transformers_apply_chat_template(gpt2_tiny, tmp_path):
    """The raw-tokenizer path (no transformers tokenizer) gives transformers' ids, special tokens included."""
    from transformers import AutoTokenizer

    folder = tmp_path / "model"
    shutil.copytree(gpt2_tiny, folder)
    (folder / "chat_template.jinja").write_text(CHATML.replace("<|im_start|>", "<|endoftext|>"))
    lm = kvgen.load(folder, dtype="float32")
    assert lm.tokenizer.transformers is None  # kvgen's own path, not transformers' tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "It was the best of times"}]
    reference = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    ids = render(lm, messages, lm.tokenizer.chat_template)
    assert ids == list(reference) and ids.count(lm.tokenizer.eos_token_id) == 3


def test_bad_messages(lm):
    with pytest.raises(ValueError, match="no messages"):
        lm.chat([])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        lm.chat([{"text": "hi"}])


def test_terminal_chat(lm, gpt2_tiny, tmp_path):
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvgen",
            "chat",
            "-m",
            str(gpt2_tiny),
            "-n",
            "6",
            "--ignore-eos",
            "--chat-template",
            str(template),
        ],
        input="It was the best of times\nCall me\n/reset\nAlice\n/exit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("prefilled") == 3 and "(conversation reset)" in done.stderr
    counts = [int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("[prefilled")]
    alone = [
        len(render(lm, [{"role": "user", "content": text}], CHATML))
        for text in ("It was the best of times", "Call me", "Alice")
    ]
    assert counts[0] == alone[0] and counts[2] == alone[2]  # a fresh conversation prefills everything
    assert counts[1] < alone[0] + alone[1]  # the second turn did not prefill the first one again
