"""The README's Python examples run as written (in order, sharing one namespace)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "[176, 176]" in out and "rows=12" in out
    assert "['first', 'hidden', 'last', 'bias']" in out  # param_groups by role on a custom net
    # The custom layer's equivalence check ran (assert_tracks_limit raises if it fails) and printed.
    errors = [float(e) for e in re.findall(r"\[([0-9.]+), ([0-9.]+), ([0-9.]+)\]", out)[-1]]
    assert errors[0] > errors[1] > errors[2]
