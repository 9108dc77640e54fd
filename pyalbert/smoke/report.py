"""Smoke results as JUnit XML (GitLab's test report) and as a rich table."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree as ET

from rich.table import Table

from pyalbert.smoke.checks import CheckResult


def junit_xml(results: list[CheckResult], suite: str) -> bytes:
    root = ET.Element("testsuites")
    node = ET.SubElement(root, "testsuite", {
        "name": suite,
        "tests": str(len(results)),
        "failures": str(sum(r.failed for r in results)),
        "errors": "0",
        "skipped": str(sum(r.status == "skipped" for r in results)),
        "time": f"{sum(r.seconds for r in results):.3f}",
    })
    for result in results:
        case = ET.SubElement(node, "testcase", {"classname": suite, "name": result.name,
                                                "time": f"{result.seconds:.3f}"})
        if result.failed:
            ET.SubElement(case, "failure", {"message": result.detail}).text = result.detail
        elif result.status == "skipped":
            ET.SubElement(case, "skipped", {"message": result.detail})
        elif result.detail:
            ET.SubElement(case, "system-out").text = result.detail
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(path: Path, results: list[CheckResult], suite: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(junit_xml(results, suite))


def summary_table(results: list[CheckResult], title: str) -> Table:
    table = Table(title=title)
    for column in ("check", "result", "time", "detail"):
        table.add_column(column, overflow="fold")
    style = {"passed": "[green]passed[/]", "failed": "[bold red]FAILED[/]", "skipped": "[yellow]skipped[/]"}
    for r in results:
        table.add_row(r.name, style[r.status], f"{r.seconds:.2f} s", r.detail)
    return table
