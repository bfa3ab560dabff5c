"""IncrementalText: generated token ids -> text deltas, with the demo model's byte-level BPE
tokenizer (a character can span several tokens) and with fake decoders where exact
hold-back matters."""

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from afina.serving.text import IncrementalText

INCOMPLETE = "\ufffd"


@pytest.fixture(scope="module")
def tokenizer(demo_model: Path):
    return AutoTokenizer.from_pretrained(demo_model)


@pytest.fixture(scope="module")
def decode(tokenizer) -> Callable[[Sequence[int]], str]:
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def encode(tokenizer) -> Callable[[str], list[int]]:
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def feed(text: IncrementalText, ids: Sequence[int]) -> list[str]:
    """The delta of each token until a stop string ends the text (as the decoding loop
    does), then what `flush` gives."""
    deltas = []
    for token in ids:
        deltas.append(text.add(token))
        if text.stopped:
            break
    return [*deltas, text.flush()]


def chars(text: str) -> list[int]:
    """Ids for the one-character-per-id fake decoder."""
    return [ord(character) for character in text]


def by_char(ids: Sequence[int]) -> str:
    return "".join(chr(i) for i in ids)


def pieces_decoder(pieces: Sequence[str]) -> Callable[[Sequence[int]], str]:
    """A fake decoder whose token i is the string pieces[i]."""
    return lambda ids: "".join(pieces[i] for i in ids)


# --- with the real byte-level BPE tokenizer -----------------------------------------------


@pytest.mark.parametrize(
    "sample",
    [
        "The quick brown fox jumps over the lazy dog.",
        "café, crème brûlée, é",
        "中文字符",
        "hi 😀 there 🎉!",
        "mixed: naïve 日本 🙂 end",
    ],
    ids=["ascii", "latin", "cjk", "emoji", "mixed"],
)
def test_deltas_add_up_to_the_full_decode_and_never_split_a_character(decode, encode, sample):
    ids = encode(sample)
    text = IncrementalText(decode)
    sent = ""
    for count, token in enumerate(ids, start=1):
        delta = text.add(token)
        assert INCOMPLETE not in delta, (sample, count, delta)
        sent += delta
        # Everything decodable so far is out, and nothing of a half-received character.
        assert sent == decode(ids[:count]).rstrip(INCOMPLETE)
    assert text.flush() == ""
    assert sent == decode(ids) == sample
    assert text.text == sample
    assert not text.stopped


@pytest.mark.parametrize("character", ["é", "中", "😀"])
def test_a_character_spread_over_tokens_comes_out_whole_with_its_last_byte(
    decode, encode, character
):
    ids = encode(character)
    assert len(ids) > 1, "the case needs a character that byte-level BPE splits"
    text = IncrementalText(decode)
    assert [text.add(token) for token in ids[:-1]] == [""] * (len(ids) - 1)
    assert text.add(ids[-1]) == character
    assert text.flush() == ""


def test_flush_gives_a_last_character_whose_bytes_never_all_came(decode, encode):
    ids = encode("ok😀")[:-1]  # the emoji's last byte never comes
    text = IncrementalText(decode)
    deltas = [text.add(token) for token in ids]
    assert "".join(deltas) == "ok"
    rest = text.flush()
    assert rest.startswith(INCOMPLETE)
    assert "".join(deltas) + rest == decode(ids)


def test_special_tokens_decode_to_nothing(tokenizer, decode, encode):
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = [start, *encode("hello"), end, *encode(" world"), end, tokenizer.eos_token_id]
    deltas = feed(IncrementalText(decode), ids)
    assert deltas[0] == ""  # <|im_start|>
    assert deltas[len(encode("hello")) + 1] == ""  # <|im_end|>
    assert deltas[-3:] == ["", "", ""]  # <|im_end|>, </s>, flush
    assert "".join(deltas) == "hello world"
    assert not any("<|" in delta for delta in deltas)


def test_a_stop_string_inside_one_token(tokenizer, decode, encode):
    ids = encode("The quick brown fox")
    assert "Ġquick" in tokenizer.convert_ids_to_tokens(ids)  # " quick" is one token
    text = IncrementalText(decode, stop=["uic"])
    deltas = [text.add(token) for token in ids[:2]]
    assert deltas == ["The", " q"]
    assert text.stopped
    assert text.text == "The q"
    assert text.flush() == ""


def test_a_stop_string_across_tokens_is_never_partly_sent(tokenizer, decode, encode):
    ids = encode("The quick brown fox jumps")
    stop = "wn fox"
    pieces = [tokenizer.decode([token]) for token in ids]
    spanned = [piece for piece in pieces if any(c in piece for c in stop)]
    assert len(spanned) > 1, pieces  # the stop string spans several tokens
    text = IncrementalText(decode, stop=[stop])
    deltas = feed(text, ids)
    assert "".join(deltas) == "The quick bro"
    assert not any("w" in delta for delta in deltas)  # not even the stop string's start
    assert text.stopped
    assert text.text == "The quick bro"


def test_a_multibyte_stop_string(decode, encode):
    ids = encode("中文字")
    deltas = feed(IncrementalText(decode, stop=["文"]), ids)
    assert "".join(deltas) == "中"
    assert not any(INCOMPLETE in delta for delta in deltas)


def test_the_earliest_of_several_stop_strings_wins(decode, encode):
    ids = encode("The quick brown fox")
    text = IncrementalText(decode, stop=["fox", "ick", "qu"])  # both in the token " quick"
    assert "".join(feed(text, ids)) == "The "
    assert text.stopped


def test_a_stop_string_at_the_very_start_sends_nothing(decode, encode):
    text = IncrementalText(decode, stop=["The"])
    assert feed(text, encode("The quick")) == ["", ""]
    assert text.stopped
    assert text.text == ""


# --- with fake decoders: exact hold-back ----------------------------------------------------


def test_text_that_may_begin_a_stop_string_is_held_then_released():
    text = IncrementalText(by_char, stop=["abc"])
    assert [text.add(i) for i in chars("xab")] == ["x", "", ""]
    assert text.add(ord("x")) == "abx"  # "abx" cannot begin "abc"
    assert text.add(ord("a")) == ""
    assert text.flush() == "a"
    assert not text.stopped
    assert text.text == "xabxa"


def test_a_stop_string_across_deltas_cuts_the_held_text():
    text = IncrementalText(by_char, stop=["END"])
    assert feed(text, chars("okEND")) == ["o", "k", "", "", "", ""]
    assert text.stopped
    assert text.text == "ok"


def test_flush_returns_what_was_held_back():
    text = IncrementalText(by_char, stop=["<stop>"])
    assert [text.add(i) for i in chars("hi <st")] == ["h", "i", " ", "", "", ""]
    assert text.flush() == "<st"
    assert text.flush() == ""
    assert not text.stopped


def test_a_repeated_prefix_releases_only_what_cannot_begin_the_stop_string():
    text = IncrementalText(by_char, stop=["aab"])
    assert [text.add(i) for i in chars("aaa")] == ["", "", "a"]
    assert text.add(ord("b")) == ""  # "aab" completes at 1: the held "a" before it goes
    assert text.stopped
    assert text.text == "a"
    assert text.flush() == ""


def test_the_longest_possible_start_is_held_over_several_stop_strings():
    text = IncrementalText(by_char, stop=["abc", "bd"])
    assert [text.add(i) for i in chars("xab")] == ["x", "", ""]  # "ab" may begin "abc"
    assert text.add(ord("d")) == "a"  # "bd" ended it: the "a" before it is text
    assert text.stopped
    assert text.text == "xa"


def test_the_earliest_stop_string_in_one_delta_wins_whatever_the_order_given():
    decode = pieces_decoder(["say: ", "one END two STOP three"])
    for stop in (["STOP", "END"], ["END", "STOP"]):
        text = IncrementalText(decode, stop=stop)
        assert feed(text, [0, 1]) == ["say: ", "one ", ""]
        assert text.stopped


def test_a_stop_string_is_found_in_text_already_partly_held():
    decode = pieces_decoder(["ab", "cd", "ef"])
    text = IncrementalText(decode, stop=["bcde"])
    assert text.add(0) == "a"  # "b" may begin "bcde"
    assert text.add(1) == ""  # "bcd" still may
    assert text.add(2) == ""
    assert text.stopped
    assert text.text == "a"


def test_empty_stop_strings_are_ignored():
    text = IncrementalText(by_char, stop=["", "z"])
    assert feed(text, chars("abc")) == ["a", "b", "c", ""]
    assert not text.stopped


def test_without_stop_strings_nothing_is_held():
    text = IncrementalText(by_char)
    assert feed(text, chars("a b")) == ["a", " ", "b", ""]
    assert text.text == "a b"
