"""The deploy user's sudo rules are exactly what the code runs with sudo: today, nothing.

Every ``sudo`` the tools send to a host goes through ``pyalbert.commands.base.sudo`` or a
``"sudo"`` argv; the only one is provisioning's (the admin user running init_vm.sh, not the deploy
user). So utils/init_vm.sh installs no rule. Adding a sudo call for the deploy user means adding
its exact command line to init_vm.sh and to ALLOWED below.
"""

from __future__ import annotations

import ast
from pathlib import Path

from pyalbert.commands.provision import INIT_VM

REPO = Path(__file__).resolve().parents[2]
#: (file, function) pairs allowed to build a sudo command, and why
ALLOWED = {
    ("pyalbert/commands/base.py", "sudo"): "the builder itself",
    ("pyalbert/commands/provision.py", "init_vm"): "the admin user (not the deploy user) runs init_vm.sh",
    ("pyalbert/engine/provision.py", "admin"):
        "the admin user (not the deploy user) installs a host group's Ray firewall",
}


def sudo_uses(path: Path) -> set[tuple[str, str]]:
    """(file, enclosing function) of every ``sudo(...)`` call and ``"sudo"`` string argument."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    rel = path.relative_to(REPO).as_posix()

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            if isinstance(child, ast.Call):
                callee = child.func
                called = callee.id if isinstance(callee, ast.Name) else getattr(callee, "attr", "")
                literal = [a for a in child.args if isinstance(a, ast.Constant) and a.value == "sudo"]
                if called == "sudo" or literal:
                    found.add((rel, function))
            visit(child, name)

    visit(tree, "<module>")
    return found


def test_no_code_runs_sudo_as_the_deploy_user():
    files = [p for d in ("pyalbert", "deploy", "ci") for p in (REPO / d).rglob("*.py")]
    uses = set().union(*(sudo_uses(p) for p in files))
    assert uses <= set(ALLOWED), f"sudo used without a rule in utils/init_vm.sh: {sorted(uses - set(ALLOWED))}"


def test_init_vm_grants_the_deploy_user_no_sudo_rule():
    script = INIT_VM.read_text()
    assert "NOPASSWD" not in script and "Cmnd_Alias" not in script
    assert "ensure_no_sudoers" in script  # and removes the rules earlier versions installed
