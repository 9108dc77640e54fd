"""fab status judges every unit the current release declares (issue 15 item 2)."""

from pyalbert.engine.unit_status import judge, verdict

MANIFEST = {"units": [
    {"name": "albert-l-edge", "service": "edge"},
    {"name": "albert-l-api-*", "service": "api"},
    {"name": "albert-l-vllm-m-a", "service": "vllm", "model": "m-a"},
]}


def row(name, service, state="running", health="ok", **kw):
    return {"name": name, "service": service, "state": state, "health": health, **kw}


EDGE, API = row("albert-l-edge", "edge"), row("albert-l-api-blue", "api", health="-")


def test_a_stopped_model_server_is_shown_and_not_serving():
    rows, bad = judge(MANIFEST, [EDGE, API], now=1000)
    assert [r["name"] for r in rows][-1] == "albert-l-vllm-m-a"
    assert rows[-1]["verdict"] == "stopped" and bad == ["albert-l-vllm-m-a: stopped"]


def test_all_running_serves():
    rows, bad = judge(MANIFEST, [EDGE, API, row("albert-l-vllm-m-a", "vllm")], now=1000)
    assert bad == [] and {r["verdict"] for r in rows} == {"running"}


def test_failed_crash_looping_and_not_ready_do_not_serve():
    cases = {
        "failed": row("albert-l-vllm-m-a", "vllm", state="failed"),
        "crash-looping": row("albert-l-vllm-m-a", "vllm", restart_times=[900, 990]),
        "not ready": row("albert-l-vllm-m-a", "vllm", health="http 503"),
    }
    for expected, r in cases.items():
        _, bad = judge(MANIFEST, [EDGE, API, r], now=1000)
        assert bad == [f"albert-l-vllm-m-a: {expected}"], expected


def test_old_restarts_are_not_a_crash_loop():
    assert verdict(row("x", "vllm", restart_times=[1, 2, 3]), now=10_000) == "running"
    assert verdict(row("x", "vllm", state="restarting"), now=0) == "crash-looping"


def test_no_release_declares_nothing():
    assert judge(None, [EDGE], now=0) == ([{**EDGE, "verdict": "running"}], [])
