"""Regenerate tests/golden/tiny_5_steps.json. Only run this when a change is meant to move the numbers,
and say why in the commit message.   Usage: .venv/bin/python scripts/regen_golden.py"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from golden_run import GOLDEN, golden_run  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    values = golden_run(Path(tmp))
GOLDEN.parent.mkdir(exist_ok=True)
GOLDEN.write_text(json.dumps(values, indent=2) + "\n")
print(f"wrote {GOLDEN}")
