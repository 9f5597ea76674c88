"""The verb table: every verb comes from a package's cli.py, parses, shows its help, and the front door stays
light (building the parser imports no torch)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lmforge
from lmforge.cli import GROUPS, all_verbs, main
from lmforge.verbs import Verb

VERBS = all_verbs()
SRC = Path(lmforge.__file__).parent


def test_every_verb_is_a_record_with_a_unique_path():
    assert all(isinstance(v, Verb) and callable(v.arguments) and callable(v.run) for v in VERBS)
    paths = [v.path for v in VERBS]
    assert len(set(paths)) == len(paths)
    assert {" ".join(v.path[:-1]) for v in VERBS if len(v.path) > 1} == set(GROUPS)


@pytest.mark.parametrize("path", [v.path for v in VERBS] + [(g,) for g in GROUPS] + [()],
                         ids=lambda p: " ".join(p) or "lmforge")
def test_help(path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {' '.join(['lmforge', *path])} ")


def test_no_verb_handlers_in_library_modules():
    allowed = {SRC / "cli.py", SRC / "verbs.py"}
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "cli.py" or path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("cmd_"):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}")
    assert offenders == []


def test_building_the_parser_does_not_import_torch():
    code = "import sys; from lmforge.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
