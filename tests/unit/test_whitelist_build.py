"""create_whitelist: sources -> deterministic JSON; failures name the source and write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from pyalbert.cli import main
from pyalbert.config.environment import WhitelistSpec
from pyalbert.errors import AlbertError, ConfigError
from pyalbert.whitelist import Whitelist
from pyalbert.whitelist import build as build_module
from pyalbert.whitelist.build import create_whitelist

MD = "See https://www.service-public.fr/particuliers/vosdroits/ or call 01 23 45 67 89.\n"
HTML = """<html><head><style>a{}</style><script>var u="https://tracker.example/x"</script></head>
<body><a href="https://www.impots.gouv.fr/accueil?utm_source=nl#top">impots</a>
<a href="mailto:Presse@DGFIP.finances.gouv.fr">presse</a> <a href="tel:+33809401401">0 809 401 401</a>
<p>From abroad: +33 (0)1 72 95 20 42 &amp; www.ameli.fr</p></body></html>"""
TRUSTED = {"domains": ["WWW.caf.fr"], "phones": ["3939"], "note": "write to aide@caf.fr"}
JSONL = '{"q": "où ?", "a": "https://www.legifrance.gouv.fr/"}\n\n{"a": "tél 3646"}\n'


def write_sources(config: Path) -> None:
    folder = config / "wl"
    (folder / "nested").mkdir(parents=True)
    (folder / "guide.md").write_text(MD)
    (folder / "nested" / "impots.html").write_text(HTML)
    (folder / "trusted.json").write_text(json.dumps(TRUSTED))
    (folder / "faq.jsonl").write_text(JSONL)
    (folder / "logo.png").write_bytes(b"\x89PNG\x00\xff")  # not a source type: skipped
    (folder / ".hidden.md").write_text("https://hidden.example/")


def spec(**kwargs) -> WhitelistSpec:
    return WhitelistSpec(**{"sources": ("wl",), "output": "out/whitelist.json", **kwargs})


def test_build_extracts_normalises_and_sorts(tmp_path):
    write_sources(tmp_path)
    result = create_whitelist(spec(allow_emails=("Contact@Albert.fr",)), tmp_path)
    assert result.changed and result.path == tmp_path / "out" / "whitelist.json"
    document = json.loads(result.path.read_text())
    assert document["version"] == 1
    assert document["entries"] == {
        "urls": [
            "https://www.ameli.fr/",
            "https://www.impots.gouv.fr/accueil",
            "https://www.legifrance.gouv.fr/",
            "https://www.service-public.fr/particuliers/vosdroits",
        ],
        "domains": ["caf.fr"],
        "emails": ["aide@caf.fr", "contact@albert.fr", "presse@dgfip.finances.gouv.fr"],
        # short numbers only from explicit lists: "tél 3646" in the JSONL text is not taken
        "phones": ["+33123456789", "+33172952042", "+33809401401", "3939"],
    }
    assert document["counts"] == {"urls": 4, "domains": 1, "emails": 3, "phones": 4}
    assert [s["source"] for s in document["sources"]] == [
        "wl/faq.jsonl", "wl/guide.md", "wl/nested/impots.html", "wl/trusted.json",
    ]
    assert all(len(s["sha256"]) == 64 for s in document["sources"])
    wl = Whitelist.load(result.path)
    assert wl.version == result.version and len(wl) == 12
    assert wl.allows("url", "https://www.caf.fr/allocataires")
    assert not wl.allows("url", "https://tracker.example/x")


def test_rerun_is_byte_identical_and_unchanged(tmp_path):
    write_sources(tmp_path)
    first = create_whitelist(spec(), tmp_path)
    content, mtime = first.path.read_bytes(), first.path.stat().st_mtime_ns
    again = create_whitelist(spec(), tmp_path)
    assert not again.changed
    assert again.path.read_bytes() == content and again.path.stat().st_mtime_ns == mtime
    (tmp_path / "wl" / "guide.md").write_text(MD + "www.urssaf.fr\n")
    assert create_whitelist(spec(), tmp_path).changed
    assert "https://www.urssaf.fr/" in json.loads(first.path.read_text())["entries"]["urls"]


def fake_web(pages: dict[str, tuple[int, str, str]]) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        status, ctype, body = pages.get(str(request.url), (404, "text/plain", "not found"))
        return httpx.Response(status, headers={"content-type": ctype}, text=body)

    return httpx.Client(transport=httpx.MockTransport(handler))


def test_url_sources_are_fetched_and_typed_by_content_type(tmp_path):
    client = fake_web({"https://pages.example/contact": (200, "text/html; charset=utf-8", HTML)})
    result = create_whitelist(spec(sources=("https://pages.example/contact",)), tmp_path, client=client)
    document = result.document
    assert "presse@dgfip.finances.gouv.fr" in document["entries"]["emails"]
    assert document["sources"][0]["source"] == "https://pages.example/contact"


def keep_old_output(tmp_path: Path) -> Path:
    out = tmp_path / "out" / "whitelist.json"
    out.parent.mkdir(parents=True)
    out.write_text("old")
    return out


@pytest.mark.parametrize(
    ("sources", "files", "message"),
    [
        (("https://pages.example/gone",), {}, "https://pages.example/gone answered HTTP 404"),
        (("https://down.example/",), {}, "https://down.example/ cannot be fetched (ConnectError"),
        (("missing.md",), {}, "missing.md cannot be read"),
        (("bad.json",), {"bad.json": '{"a": 1,\n}'}, "bad.json has malformed JSON at line 2"),
        (("bad.jsonl",), {"bad.jsonl": '{"a": 1}\n{oops}\n'}, "bad.jsonl has malformed JSON at line 2"),
        (("bad.json",), {"bad.json": '{"urls": ["ftp://x"]}'}, "'ftp://x' under 'urls' is not a valid url"),
        (("latin1.txt",), {"latin1.txt": b"caf\xe9"}, "latin1.txt is not UTF-8 text"),
        (("empty",), {"empty/x.png": b""}, "holds no"),
    ],
    ids=["http-404", "unreachable", "missing-file", "json-syntax", "jsonl-syntax", "bad-entry",
         "encoding", "empty-folder"],
)
def test_source_errors_name_the_source_and_write_nothing(tmp_path, sources, files, message):
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = keep_old_output(tmp_path)

    def refuse(request: httpx.Request) -> httpx.Response:
        if request.url.host == "down.example":
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(404)

    client = httpx.Client(transport=httpx.MockTransport(refuse))
    with pytest.raises(AlbertError) as info:
        create_whitelist(spec(sources=sources), tmp_path, client=client)
    assert message in str(info.value) and "Nothing was written" in str(info.value)
    assert out.read_text() == "old"
    assert [p.name for p in out.parent.iterdir()] == ["whitelist.json"]


def test_invalid_allow_entries_name_the_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        create_whitelist(spec(sources=(), allow_urls=("https://ok.fr", "nope"), allow_phones=("12",)),
                         tmp_path, env_file="environments/test.toml")
    text = str(info.value)
    assert "environments/test.toml: key 'whitelist.allow_urls[1]': 'nope' is not a valid url" in text
    assert "whitelist.allow_phones[0]" in text


def test_failed_rename_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    write_sources(tmp_path)
    out = keep_old_output(tmp_path)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(build_module.os, "replace", broken_replace)
    with pytest.raises(OSError):
        create_whitelist(spec(), tmp_path)
    assert out.read_text() == "old"
    assert [p.name for p in out.parent.iterdir()] == ["whitelist.json"]


def test_cli_create_whitelist_and_alias(simple_config, capsys):
    folder = simple_config.root / "whitelist"
    folder.mkdir()
    (folder / "a.md").write_text(MD)
    env_file = simple_config.root / "environments" / "test.toml"
    env_file.write_text(env_file.read_text() + '\n[whitelist]\nsources = ["whitelist"]\n'
                        'output = "build/wl.json"\nallow_domains = ["gouv.fr"]\n')
    args = ["--env", "test", "--config-dir", str(simple_config.root)]
    assert main(["create_whitelist", *args]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["create-whitelist", *args]) == 0
    assert "unchanged" in capsys.readouterr().out
    assert main(["whitelist", "create", *args, "--output", str(simple_config.root / "other.json")]) == 0
    assert (simple_config.root / "other.json").read_bytes() == (
        simple_config.root / "build" / "wl.json").read_bytes()


def test_cli_reports_errors_in_one_paragraph(simple_config, capsys):
    env_file = simple_config.root / "environments" / "test.toml"
    env_file.write_text(env_file.read_text() + '\n[whitelist]\nsources = ["nowhere.md"]\n')
    assert main(["create_whitelist", "--env", "test", "--config-dir", str(simple_config.root)]) == 1
    err = capsys.readouterr().err
    assert "nowhere.md cannot be read" in err and "Traceback" not in err
