"""The answer matcher: normalisation, allow rules, post-processing modes, streaming invariant."""

from __future__ import annotations

import json
import random

import pytest

from pyalbert.errors import AlbertError
from pyalbert.whitelist import REDACTIONS, StreamFilter, Whitelist, postprocess
from pyalbert.whitelist.normalize import (
    normalize_domain,
    normalize_email,
    normalize_phone,
    normalize_url,
)
from pyalbert.whitelist.scanner import MAX_REGION

WL = Whitelist.from_entries(
    urls=["https://www.impots.gouv.fr/contact/"],
    domains=["service-public.fr"],
    emails=["contact@albert.fr"],
    phones=["+33 1 23 45 67 89", "3949"],
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("HTTPS://WWW.Example.FR", "https://www.example.fr/"),
        ("http://example.fr:80/a/", "http://example.fr/a"),
        ("https://example.fr:443/a/b/#frag", "https://example.fr/a/b"),
        ("https://example.fr:8443/", "https://example.fr:8443/"),
        ("https://x.fr/p?utm_source=a&b=2&fbclid=z&a=1&gclid=q&UTM_medium=m", "https://x.fr/p?a=1&b=2"),
        ("www.x.fr/page", "https://www.x.fr/page"),
        ("ftp://x.fr/", None),
        ("https://", None),
        ("https://x.fr:99999/", None),
    ],
    ids=["case", "default-port-http", "fragment-and-slash", "other-port", "tracking", "bare-www",
         "ftp", "no-host", "bad-port"],
)
def test_normalize_url(raw, expected):
    assert normalize_url(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+33 1 23 45 67 89", "+33123456789"),
        ("+33 (0)1 23 45 67 89", "+33123456789"),
        ("+33(0)123456789", "+33123456789"),
        ("0033 1 23 45 67 89", "+33123456789"),
        ("01 23 45 67 89", "+33123456789"),
        ("01.23.45.67.89", "+33123456789"),
        ("01-23-45-67-89", "+33123456789"),
        ("0123456789", "+33123456789"),
        ("tel:+33123456789", "+33123456789"),
        ("+1 (555) 123-4567", "+15551234567"),
        ("3949", "3949"),
        ("+33 1 23", None),
        ("12", None),
        ("hello", None),
    ],
)
def test_normalize_phone(raw, expected):
    assert normalize_phone(raw) == expected


def test_normalize_email_and_domain():
    assert normalize_email("Contact@Albert.FR") == "contact@albert.fr"
    assert normalize_email("mailto:a@b.fr?subject=x") == "a@b.fr"
    assert normalize_email("not-an-email") is None
    assert normalize_domain("WWW.Service-Public.FR.") == "service-public.fr"
    assert normalize_domain("https://www.x.gouv.fr/page") == "x.gouv.fr"
    assert normalize_domain("localhost") is None


@pytest.mark.parametrize(
    ("kind", "text", "allowed"),
    [
        ("url", "https://www.service-public.fr/particuliers", True),
        ("url", "http://service-public.fr", True),
        ("url", "https://annuaire.service-public.fr/x?utm_campaign=1", True),
        ("url", "https://evil-service-public.fr/", False),
        ("url", "https://service-public.fr.evil.com/", False),
        ("url", "http://www.impots.gouv.fr/contact#top", True),
        ("url", "https://www.impots.gouv.fr/contact?fbclid=abc", True),
        ("url", "https://www.impots.gouv.fr/other", False),
        ("email", "CONTACT@albert.fr", True),
        ("email", "agent@service-public.fr", True),
        ("email", "agent@sub.service-public.fr", True),
        ("email", "other@albert.fr", False),
        ("phone", "01 23 45 67 89", True),
        ("phone", "+33 (0)1.23.45.67.89", True),
        ("phone", "01 23 45 67 88", False),
        ("phone", "3949", True),
        ("phone", "3950", False),
    ],
)
def test_allows(kind, text, allowed):
    assert WL.allows(kind, text) is allowed


def test_allows_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown kind"):
        WL.allows("fax", "x")


TEXT = (
    "Voir https://www.service-public.fr/vosdroits?utm_source=x. Ou [lien](http://evil.com/a) "
    "et www.impots.gouv.fr/contact, écrivez à Contact@Albert.fr ou a@b.com. "
    "Appelez le +33 (0)1 23 45 67 89, le 01.23.45.67.88 ou le 3949. En 2024, 15 personnes."
)


def test_findings_kinds_spans_and_verdicts():
    found = [(f.kind, TEXT[f.start:f.end], f.text, f.allowed) for f in WL.findings(TEXT)]
    assert [(k, span, allowed) for k, span, _, allowed in found] == [
        ("url", "https://www.service-public.fr/vosdroits?utm_source=x", True),
        ("url", "http://evil.com/a", False),
        ("url", "www.impots.gouv.fr/contact", True),
        ("email", "Contact@Albert.fr", True),
        ("email", "a@b.com", False),
        ("phone", "+33 (0)1 23 45 67 89", True),
        ("phone", "01.23.45.67.88", False),
        ("phone", "3949", True),
    ]
    assert all(span == text for _, span, text, _ in found)


def test_short_number_not_a_finding_unless_listed():
    assert Whitelist.empty().findings("call 3949 or 3950") == []
    assert [f.text for f in WL.findings("call 3949 or 3950")] == ["3949"]


def test_postprocess_modes():
    assert postprocess(TEXT, WL, "off") == (TEXT, [])
    flagged, found = postprocess(TEXT, WL, "flag")
    assert flagged == TEXT
    assert [f.text for f in found] == ["http://evil.com/a", "a@b.com", "01.23.45.67.88"]
    assert not any(f.allowed for f in found)
    redacted, found = postprocess(TEXT, WL, "redact")
    assert redacted == (
        "Voir https://www.service-public.fr/vosdroits?utm_source=x. Ou [lien]("
        + REDACTIONS["url"]
        + ") et www.impots.gouv.fr/contact, écrivez à Contact@Albert.fr ou a@"
        + REDACTIONS["email"]
        + ". Appelez le +33 (0)1 23 45 67 89, le "
        + REDACTIONS["phone"]
        + " ou le 3949. En 2024, 15 personnes."
    )
    assert [f.text for f in found] == ["http://evil.com/a", "a@b.com", "01.23.45.67.88"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(see https://evil.fr/a_(b))", "(see [unverified link removed])"),
        ("**https://evil.fr**", "**[unverified link removed]**"),
        ("<https://evil.fr/x>", "<[unverified link removed]>"),
        ("Is it https://evil.fr?", "Is it [unverified link removed]?"),
        ("[https://evil.fr](https://evil.fr)", "[[unverified link removed]]([unverified link removed])"),
        ("awww.evil.fr", "awww.evil.fr"),
        ("tel 0123456789123", "tel 0123456789123"),
        ("prix: 1 234 567 89 €", "prix: 1 234 567 89 €"),
    ],
    ids=["parens", "bold", "angle", "question", "md-link", "not-www", "too-long", "not-phone"],
)
def test_redact_edges(text, expected):
    assert postprocess(text, Whitelist.empty(), "redact")[0] == expected


def test_load_round_trip_and_version(tmp_path):
    path = tmp_path / "whitelist.json"
    data = {"version": 1, "entries": {"urls": [], "domains": ["gouv.fr"], "emails": [], "phones": ["3949"]}}
    path.write_text(json.dumps(data))
    wl = Whitelist.load(path)
    assert len(wl) == 2 and wl.allows("url", "https://www.impots.gouv.fr/")
    assert len(wl.version) == 12 and wl.version != Whitelist.empty().version
    path.write_text(json.dumps({**data, "entries": {**data["entries"], "urls": ["https://a.fr/"]}}))
    assert Whitelist.load(path).version != wl.version
    assert len(Whitelist.empty()) == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot be read"),
        ("{not json", "not valid JSON"),
        ('{"version": 7, "entries": {}}', "not a version 1 whitelist"),
        ('{"version": 1, "entries": {"urls": "x"}}', "lists of strings"),
        ('{"version": 1, "entries": {"faxes": []}}', "unknown entry list(s) faxes"),
    ],
    ids=["missing", "syntax", "version", "shape", "unknown-key"],
)
def test_load_errors_name_the_file_and_fix(tmp_path, content, message):
    path = tmp_path / "wl.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(AlbertError) as info:
        Whitelist.load(path)
    assert message in str(info.value)
    assert str(path) in str(info.value) and "albert create_whitelist" in str(info.value)


# --- streaming --------------------------------------------------------------------------------

TOKENS = [
    "https://www.service-public.fr/a?utm_source=x", "http://evil.com/a_(b)", "www.evil.fr/x.",
    "Contact@Albert.fr", "a@b.com", "x@evil.fr,", "+33 (0)1 23 45 67 89", "+33 1 23 45 67 88",
    "01.23.45.67.88", "0612345678", "06 12 34 56 78", "3949", "2024", "15", "(0)", "+", "@", "www.",
    "https://", "le", "et", "ou", "Bonjour", "d'accord", "é", "**", "[", "](", ")", ".", ",", "\n",
    " ", " ", " ", "\u00a0", "\t", "1", "23",
]


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(TOKENS) + rng.choice(["", " ", " ", "\n"]) for _ in range(rng.randint(0, 40)))


def random_chunks(rng: random.Random, text: str) -> list[str]:
    if not text:
        return [""]
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, len(text)))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize("mode", ["off", "flag", "redact"])
def test_stream_equals_postprocess_for_any_chunking(mode):
    rng = random.Random(f"whitelist-{mode}")
    for _ in range(300):
        text = random_text(rng)
        expected, expected_findings = postprocess(text, WL, mode)
        if mode != "redact":
            assert expected == text
        for _ in range(3):
            stream = StreamFilter(WL, mode)
            chunks = random_chunks(rng, text)
            out = "".join(stream.feed(c) for c in chunks) + stream.flush()
            assert out == expected, (text, chunks)
            assert stream.findings == expected_findings


def test_stream_emits_plain_text_at_once_and_holds_only_a_partial_match():
    stream = StreamFilter(WL, "redact")
    sentence = "Ceci est une longue phrase sans lien ni numéro. " * 20
    assert stream.feed(sentence) == sentence
    assert stream.held == 0
    assert stream.feed("Voir https://evil.fr/lo") == "Voir "
    assert stream.held == len("https://evil.fr/lo")
    assert stream.feed("ng et ") == REDACTIONS["url"] + " et "
    assert stream.feed("appelez le 01 23 ") == "appelez le "
    assert stream.feed("45 67 88.") == ""
    assert stream.flush() == REDACTIONS["phone"] + "."
    assert [f.kind for f in stream.findings] == ["url", "phone"]


def test_stream_hold_is_bounded_for_spaced_digits():
    stream = StreamFilter(WL, "flag")
    emitted = "".join(stream.feed("1 ") for _ in range(2000))
    assert stream.held <= MAX_REGION + 2
    assert emitted + stream.flush() == "1 " * 2000


def test_stream_findings_carry_stream_offsets():
    stream = StreamFilter(WL, "flag")
    for chunk in ["ab ", "cd a@", "b.com x"]:
        stream.feed(chunk)
    stream.flush()
    (finding,) = stream.findings
    assert (finding.start, finding.end, finding.text) == (6, 13, "a@b.com")


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown whitelist mode"):
        StreamFilter(WL, "loud")  # type: ignore[arg-type]


def test_stream_equals_postprocess_across_forced_cuts():
    """Long runs of spaced digits hit MAX_REGION; the forced cuts must not depend on chunking."""
    rng = random.Random("forced")
    pieces = ["1", "23", "01 23 45 67 88", "+33 1 23 45 67 88", "a@b.com", "http://evil.fr/x"]
    for _ in range(20):
        text = " ".join(rng.choice(pieces) for _ in range(rng.randint(100, 400)))
        expected = postprocess(text, WL, "redact")[0]
        assert REDACTIONS["phone"] in expected or "01 23" not in text
        for _ in range(3):
            stream = StreamFilter(WL, "redact")
            out = "".join(stream.feed(c) for c in random_chunks(rng, text)) + stream.flush()
            assert out == expected
