import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert "MaxVio_batch=" in capsys.readouterr().out


def test_readme_quick_start_matches_ci():
    text = README.read_text()
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert "make test" in text and "make test" in ci
    assert "make demo" in text
