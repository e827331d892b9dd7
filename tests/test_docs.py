"""The documentation stands alone and quotes only figures that a stored result holds.

What this checks, in README.md and docs/*.md:

1. Links: every relative markdown link or image (``[text](path)``, ``![alt](path#anchor)``)
   resolves to a file inside the repository, and its ``#anchor`` (also a bare ``(#anchor)``) to a
   heading of that file (GitHub's slugs). Nothing names ``../shared`` or ``/work/``: the repository
   must stand alone.
2. Results markers: a line ``<!-- results: FILE [FILE ...] -->`` says which stored result files
   (under ``benchmarks/results/`` or ``docs/results/``) the markdown table right below it quotes.
   Every number with a decimal point in that table's rows must equal, at its printed precision, a
   number stored in one of those files (JSON: every number in it, at any depth; markdown: every
   number in the text). A test below regenerates one such file on the smoke preset and compares.
3. Coverage: a table of decimal figures that has a command beside it (a backticked
   ``moebalance ...``, ``make demo`` / ``make bench``, ``benchmarks/run.py``, or a result tag
   ``bench_cpu...``, in the table, the paragraph above it or its section heading) must carry a
   marker, unless :data:`UNSTORED` lists it with the reason.

Not checked: numbers in running text (ranges and percentages are read off the tables, by eye),
derived numbers (a ratio of two stored medians is stored by the benchmark script; one computed
only in prose is not caught), and whether a stored file is what the command beside it prints today
(only the leakage table is regenerated here, since it takes seconds; the others take minutes to
hours).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
MARKER = re.compile(r"^<!-- results: (.+?) -->$")
FIGURE = re.compile(r"(?<![\w.])-?\d+\.\d+(?:e[-+]?\d+)?(?![\w.]*\d)")
COMMAND = re.compile(r"`[^`]*(moebalance \w|make (demo|bench)|benchmarks/run\.py|bench_cpu)[^`]*`")

# Tables with a command beside them whose figures no stored file holds yet: (file, first header
# cell) -> why. Each is a gap to close, not a licence.
UNSTORED = {
    ("distributed.md", "run"): "an expert-parallel replay of runs under runs/rep, which are not stored",
    ("reproduction.md", ""): "the paper's published figures (arXiv 2408.15664 Table 2); ours are the README's stored demo report",
    ("reproduction.md", 'change'): "measured runs of the research session (commands beside them); their run folders are not stored",
    ("benchmarks.md", "section"): "what each benchmark section compares: a description, no measured figures",
}


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", text, flags=re.M)}


def tables(path: Path) -> list[tuple[int, list[str]]]:
    """``(first line index, lines)`` of every markdown table outside code blocks."""
    lines, found, start, fenced = path.read_text().splitlines(), [], None, False
    for i, line in enumerate(lines + [""]):
        fenced ^= line.startswith("```")
        if line.startswith("|") and not fenced:
            start = i if start is None else start
        elif start is not None:
            found.append((start, lines[start:i]))
            start = None
    return found


def context(lines: list[str], start: int) -> str:
    """The paragraph right above line ``start`` and the nearest heading above it."""
    i, above = start - 1, []
    while i >= 0 and (lines[i].strip() == "" or MARKER.match(lines[i])) and len(above) == 0 and start - i < 3:
        i -= 1
    while i >= 0 and lines[i].strip() and not lines[i].startswith("#"):
        above.append(lines[i])
        i -= 1
    heading = next((ln for ln in reversed(lines[: start]) if ln.startswith("#")), "")
    return "\n".join([heading, *above])


def stored_numbers(files: list[Path]) -> list[float]:
    numbers: list[float] = []

    def walk(x) -> None:
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            numbers.append(float(x))

    for f in files:
        if f.suffix == ".json":
            walk(json.loads(f.read_text()))
        else:
            numbers += [float(m) for m in re.findall(r"-?\d+\.?\d*", f.read_text())]
    return numbers


def figures(rows: list[str]) -> list[str]:
    """Decimal figures in a table's data rows (not the header, not inside backticked commands)."""
    return [m for row in rows[2:] for m in FIGURE.findall(re.sub(r"`[^`]*`", "", row))]


def matches(figure: str, stored: list[float]) -> bool:
    """``figure`` is a stored number rounded to the digits it shows (``3.2e-01``: two of mantissa)."""
    mantissa, _, exponent = figure.partition("e")
    step = 10 ** (-len(mantissa.split(".")[1]) + int(exponent or 0))
    return any(abs(n - float(figure)) <= 0.5 * step * (1 + 1e-9) for n in stored)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve_inside_the_repo(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    assert "../shared" not in text and "/work/" not in text, f"{doc.name} names a path outside the repository"
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc
        assert dest.is_relative_to(ROOT), f"{doc.name}: {target} leaves the repository"
        assert dest.exists(), f"{doc.name}: {target} does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{doc.name}: no heading #{anchor} in {dest.name}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_quoted_figures_come_from_stored_results(doc):
    lines = doc.read_text().splitlines()
    for start, rows in tables(doc):
        marker = next((MARKER.match(ln) for ln in reversed(lines[max(0, start - 2) : start]) if MARKER.match(ln)), None)
        figs = figures(rows)
        where = f"{doc.name} line {start + 1}"
        if marker is None:
            beside = COMMAND.search("\n".join(rows)) or COMMAND.search(context(lines, start))
            key = (doc.name, rows[0].strip("|").split("|")[0].strip())
            if figs and beside and key not in UNSTORED:
                pytest.fail(f"{where}: figures with a command beside them ({beside.group(0)}) but no results marker")
            continue
        files = [ROOT / f for f in marker.group(1).split()]
        for f in files:
            stores = (ROOT / "benchmarks" / "results", ROOT / "docs" / "results")
            assert f.is_file() and any(f.is_relative_to(d) for d in stores), f"{where}: marker names {f}, not a stored result"
        stored = stored_numbers(files)
        missing = [fig for fig in figs if not matches(fig, stored)]
        assert figs and not missing, f"{where}: {missing or 'no figures'} not in {marker.group(1)}"


def test_unstored_tables_still_exist():
    for name, header in UNSTORED:
        doc = ROOT / name if name == "README.md" else ROOT / "docs" / name
        assert any(rows[0].strip("|").split("|")[0].strip() == header for _, rows in tables(doc)), (name, header)


def test_the_checks_catch_what_they_should(tmp_path):
    assert figures(["| a | b |", "|---|---|", "| `moebalance x 0.5` | 1.25 and 0.90–1.06, 3.2e-01, v2.13.0 |"]) == ["1.25", "0.90", "1.06", "3.2e-01"]
    assert matches("3.2e-01", [0.3249]) and not matches("3.2e-01", [0.33])
    assert matches("0.1504", [0.15039]) and not matches("0.150", [0.1506, 0.2])
    assert slug("The method in brief") == "the-method-in-brief" and slug("`sweep`: a grid!") == "sweep-a-grid"


@pytest.mark.slow
def test_leakage_table_of_the_initial_model_regenerates(tmp_path):
    """docs/balancing.md's first leakage column: the command beside it, run again, gives the stored file."""
    from moebalance import cli

    stored = json.loads((ROOT / "docs" / "results" / "leakage_smoke_initial" / "leakage.json").read_text())
    assert cli.main(["leakage", "--preset", "smoke", "--out", str(tmp_path), "train.threads=1"]) == 0
    fresh = json.loads((tmp_path / "leakage.json").read_text())
    for key in ("expert_choice", "loss_free", "current_batch_bias", "per_layer", "position"):
        assert fresh[key] == stored[key], key
