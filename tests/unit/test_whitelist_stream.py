"""The stream filter without added latency (issue 14, section 2).

``flag`` relays every chunk as it arrives; ``redact`` holds back only a candidate span (what can
still become a URL, e-mail or phone number), never plain words, a bounded number of characters,
and whatever the chunking, emits exactly ``postprocess(text)``, so nothing unverified leaks.
"""

from __future__ import annotations

import random

import pytest

from pyalbert.whitelist import REDACTIONS, StreamFilter, Whitelist, postprocess

WL = Whitelist.from_entries(
    urls=["https://www.impots.gouv.fr/contact/"],
    domains=["service-public.fr"],
    emails=["contact@albert.fr"],
    phones=["+33 1 23 45 67 89", "3949"],
)
URL, EMAIL, PHONE = REDACTIONS["url"], REDACTIONS["email"], REDACTIONS["phone"]

#: how an LLM streams: one token per event, a word with its leading space, links in pieces
PROSE_TOKENS = [" Pour", " renouveler", " votre", " carte", " d", "'", "identité", ",", " prenez",
                " rendez", "-", "vous", " en", " mairie", ".", " Les", " délais", " varient", "\n\n",
                "En", " 2024", ",", " 15", " 000", " personnes", " l", "'", "ont", " fait", "."]


def emitted_per_chunk(mode: str, chunks: list[str]) -> tuple[list[str], str, StreamFilter]:
    stream = StreamFilter(WL, mode)  # type: ignore[arg-type]
    outs = [stream.feed(c) for c in chunks]
    return outs, stream.flush(), stream


def test_flag_relays_every_chunk_as_it_arrives():
    """The traced case: flag held "02 703 111\\n" back and released it as one chunk."""
    chunks = ["Appelez", " le", " 02", " 703", " 111", "\n", "ou", " https", "://", "evil", ".fr",
              "/x", " ou", " 01", " 23", " 45", " 67", " 88", "."]
    outs, rest, stream = emitted_per_chunk("flag", chunks)
    assert outs == chunks
    assert rest == ""
    assert stream.held == 0
    assert [(f.kind, f.text) for f in stream.findings] == [
        ("url", "https://evil.fr/x"), ("phone", "01 23 45 67 88")]


def test_redact_never_holds_plain_words():
    outs, rest, stream = emitted_per_chunk("redact", PROSE_TOKENS)
    assert outs == PROSE_TOKENS
    assert rest == "" and stream.findings == []


def test_redact_holds_only_the_candidate_span():
    stream = StreamFilter(WL, "redact")
    steps = [
        (" Voir", " Voir"), (" https", " "), ("://", ""), ("evil", ""), (".fr", ""),
        (" et", URL + " et"),
        (" appelez", " appelez"), (" le", " le"), (" 01", " "), (" 23", ""), (" 45", ""),
        (" 67", ""), (" 88", ""), (" ou", PHONE + " ou"),
        (" écrivez", " écrivez"), (" à", " à"), (" fraude", " fraude"), ("@", "@"),
        ("evil", ""), (".", ""), ("fr", ""), (".", ""), (" Merci", EMAIL + ". Merci"),
        (" www", " "), (".", ""), ("impots", ""), (".gouv", ""), (".fr", ""), ("/contact", ""),
        (",", ""), (" bonne", "www.impots.gouv.fr/contact, bonne"), (" journée", " journée"),
    ]
    for chunk, expected in steps:
        assert (chunk, stream.feed(chunk)) == (chunk, expected)
    assert stream.flush() == ""


def test_redact_hold_is_bounded_for_spaced_digits():
    """A phone number has at most 46 characters: a longer run of digits is decided."""
    stream = StreamFilter(WL, "redact")
    worst = 0
    for _ in range(300):
        stream.feed(" 01")
        worst = max(worst, stream.held)
    assert worst <= 47


def test_email_keeps_its_local_part_and_loses_its_domain():
    """The local part streams out before its "@" (a plain word); the redaction is the same
    for a whole answer, so stream and plain answers agree."""
    text = "Écrivez à fraude.impots@evil.fr ou à contact@albert.fr."
    assert postprocess(text, WL, "redact")[0] == (
        "Écrivez à fraude.impots@" + EMAIL + " ou à contact@albert.fr.")


# --- property: any chunking, nothing unverified, nothing but candidates held ---------------------

PIECES = [
    "https://www.service-public.fr/a?utm_source=x", "http://evil.com/a_(b)", "www.evil.fr/x.",
    "Contact@Albert.fr", "a@b.com", "x@evil.fr,", "+33 (0)1 23 45 67 89", "+33 1 23 45 67 88",
    "01.23.45.67.88", "0612345678", "06 12 34 56 78", "3949", "2024", "15", "(0)", "+", "@",
    "www.", "https://", "http", "ht", "w", "le", "et", "Bonjour", "d'accord", "é", "**", "[", "](",
    ")", ".", ",", "\n", " ", " ", "\u00a0", "\t", "1", "23", "0", "00", "0033", "x+www.y@b.fr",
    "a.0123456789", "http://x.fr/06 07 12 34 56 78", "a%www.x@b.fr", "89abc", "-", "%", "a@b@c.fr",
    "mailto:", "tel:", "KELVIN\u212a", "HTTPS://EVIL.FR",
]


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) + rng.choice(["", "", " ", "\n"])
                   for _ in range(rng.randint(0, 30)))


def random_chunks(rng: random.Random, text: str) -> list[str]:
    if not text:
        return [""]
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, len(text)))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def test_redact_property_any_chunking():
    """Seeded random texts and chunkings (one character at a time included)."""
    rng = random.Random("issue-14-redact")
    for _ in range(400):
        text = random_text(rng)
        expected, expected_findings = postprocess(text, WL, "redact")
        chunkings = [random_chunks(rng, text), random_chunks(rng, text), list(text)]
        for chunks in chunkings:
            stream = StreamFilter(WL, "redact", segments=True)
            out, fed = "", ""
            for chunk in chunks:
                out += stream.feed(chunk)
                fed += chunk
                assert expected.startswith(out), (text, chunks)  # nothing to take back
                held = fed[len(fed) - stream.held:] if stream.held else ""
                # what is held starts a candidate: a link, a phone number, an e-mail's domain
                before = fed[len(fed) - stream.held - 1:len(fed) - stream.held] if stream.held else ""
                assert not held or held[0] in "hHwW+0" or before == "@", (text, chunks, held)
            out += stream.flush()
            assert out == expected, (text, chunks)
            assert stream.findings == expected_findings
            assert "".join(s[2] for s in stream.segments) == out
            for f in stream.findings:  # no character of an unverified item went out as itself
                cut = f.start + f.text.index("@") + 1 if f.kind == "email" else f.start
                assert not [s for s in stream.segments if s[3] and s[0] < f.end and cut < s[1]], \
                    (text, chunks, f)


@pytest.mark.parametrize("mode", ["flag", "redact"])
def test_findings_equal_for_stream_and_whole_answer(mode):
    rng = random.Random(f"issue-14-{mode}")
    for _ in range(200):
        text = random_text(rng)
        _, expected = postprocess(text, WL, mode)  # type: ignore[arg-type]
        stream = StreamFilter(WL, mode)  # type: ignore[arg-type]
        out = "".join(stream.feed(c) for c in random_chunks(rng, text)) + stream.flush()
        if mode == "flag":
            assert out == text
        assert stream.findings == expected
