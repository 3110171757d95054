"""The lint gate (pyproject.toml [tool.ruff]) is waived one line at a time and says why: a `# noqa` that covers
one of its rules carries `- reason` on the same line, as `# noqa: C901 - a parser's one flat table`."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOQA = re.compile(r"#\s*noqa\b(?::\s*(?P<codes>[A-Z]+[0-9]+(?:\s*,\s*[A-Z]+[0-9]+)*))?(?P<rest>.*)")
GATE_RULES = re.compile(r"F[0-9]+|C901|PLR0915")  # pyproject.toml's [tool.ruff.lint] select


def _unexplained(text: str) -> list[int]:
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        m = NOQA.search(line)
        if m is None:
            continue
        codes = re.split(r"\s*,\s*", m["codes"]) if m["codes"] else None  # None: a bare noqa waives every rule
        waives_the_gate = codes is None or any(GATE_RULES.fullmatch(code) for code in codes)
        if waives_the_gate and not re.match(r"\s*-\s*\S", m["rest"]):
            lines.append(number)
    return lines


def test_every_waiver_of_a_gate_rule_says_why():
    unexplained = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("src", "tests", "benchmarks", "scripts")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != Path(__file__).resolve()  # its examples below are unexplained on purpose
        for number in _unexplained(path.read_text(encoding="utf-8"))
    ]
    assert unexplained == []


def test_the_waiver_check_tells_a_reason_from_none():
    assert _unexplained("def f():  # noqa: C901 - a flat table of cases\n") == []
    assert _unexplained("import os  # noqa: E402 - after the environment\n") == []
    assert _unexplained("import os  # noqa: E402\n") == []  # not a rule of the gate
    assert _unexplained("def f():  # noqa: C901\n") == [1]
    assert _unexplained("x = 1\nimport os  # noqa: F401, E402\n") == [2]
    assert _unexplained("import os  # noqa\n") == [1]
