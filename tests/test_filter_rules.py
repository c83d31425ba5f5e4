"""The prose filters' rules where they used to disagree with the papers and datatrove (issue 10):
C4's sentence count, Gopher's distinct stop words, FineWeb's list rule. bench/filter_parity.py
measures the agreement on real documents."""

from __future__ import annotations

from leantrain.corpus.filters import C4Filter, FineWebQuality, GopherQuality, sentence_count
from leantrain.corpus.readers import Document
from leantrain.corpus.steps import Drop


def verdict(step, text: str) -> str | None:
    out = step.apply(Document("d", text, "test"))
    return out.reason if isinstance(out, Drop) else None


# ---- C4: every kept line is at least one sentence ----------------------------------------------

def test_sentence_count_counts_a_line_without_terminal_punctuation_as_one() -> None:
    assert sentence_count("One sentence. Another one! And a third") == 3
    assert sentence_count("a heading without any punctuation") == 1
    assert sentence_count('He said "stop." Then he left.') == 2
    assert sentence_count("   ") == 0


def test_c4_fineweb_variant_keeps_pages_of_unpunctuated_lines() -> None:
    """FineWeb runs C4 without the terminal-punctuation rule; its kept lines are sentences too."""
    page = "\n".join(f"Line number {i} describes the weather in the valley today" for i in range(5))
    assert verdict(C4Filter(terminal_punct=False), page) is None  # 5 lines: 5 sentences
    assert verdict(C4Filter(terminal_punct=False), "\n".join(page.split("\n")[:4])) == "c4:too_few_sentences"
    mixed = "A first line ends here. And a second sentence follows!\nthree more words here\nlast line has words"
    assert verdict(C4Filter(terminal_punct=False, min_sentences=4), mixed) is None  # 2 + 1 + 1


def test_c4_counts_a_line_ending_in_a_quote_as_a_sentence() -> None:
    """A line kept because it ends in a quote mark (no . ! ? before it) is one sentence, not zero."""
    lines = [f"Reader {i} wrote a note that said 'thank you'" for i in range(4)] + ["It was a good day."]
    assert verdict(C4Filter(), "\n".join(lines)) is None


# ---- Gopher: stop words present, not occurrences -----------------------------------------------

def test_gopher_stop_word_rule_counts_distinct_words() -> None:
    no_stops = " ".join(["apple", "river", "stone", "cloud", "grass"] * 10)
    g = GopherQuality()
    assert verdict(g, no_stops + " the the the the") == "gopher_quality:stop_words"  # one word, four times
    assert verdict(g, no_stops + " THE the") == "gopher_quality:stop_words"  # case folded: still one
    assert verdict(g, no_stops + " the with") is None
    assert verdict(GopherQuality(min_stop_words=3), no_stops + " the with of") is None


# ---- FineWeb: the list rule counts line breaks between lines, words without punctuation --------

def test_fineweb_list_rule_ignores_blank_lines_between_paragraphs() -> None:
    """Short prose paragraphs separated by blank lines are prose, not a list."""
    paragraphs = [f"Paragraph number {i} holds seven plain words." for i in range(10)]
    text = "\n\n\n".join(paragraphs)  # the web profile's normalize keeps up to 2 blank lines
    assert verdict(FineWebQuality(), text) is None  # 9 breaks / 60 words; counting newlines gave 27 / 60


def test_fineweb_list_rule_still_drops_lists() -> None:
    items = [f"Supercalifragilistic{i} extraordinarily-wonderful." for i in range(10)]  # 2 words, > 30 chars
    assert verdict(FineWebQuality(), "\n".join(items)) == "fineweb:list_like"  # 9 breaks / 20 words
    assert verdict(FineWebQuality(), "\n\n".join(items)) == "fineweb:list_like"  # blank lines change nothing


def test_fineweb_list_rule_does_not_count_punctuation_as_words() -> None:
    """Symbols are not words in any prose rule: dashes between the words do not make a list a paragraph."""
    items = [f"Supercalifragilistic{i} - - - - - - extraordinarily-wonderful." for i in range(10)]
    assert verdict(FineWebQuality(), "\n".join(items)) == "fineweb:list_like"


def test_fineweb_terminal_punctuation_may_be_followed_by_closing_quotes_but_a_quote_alone_is_not_one() -> None:
    f = FineWebQuality(max_dup_line_char_ratio=1.0, max_newline_word_ratio=1.0)
    quoted = [f'Speaker {i} stood up and said "we are done for today."' for i in range(10)]
    assert verdict(f, "\n".join(quoted)) is None
    code = [f'message_{i} = "the default greeting number {i}"' for i in range(10)]
    assert verdict(f, "\n".join(code)) == "fineweb:line_punct_ratio"
    assert verdict(f, "\n".join(line.replace('"', "'") for line in code)) == "fineweb:line_punct_ratio"
