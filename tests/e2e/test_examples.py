"""Every example a user copies runs (on the tiny model, to keep CI short)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).parents[2] / "examples"


def test_offline_shared_prefix(tiny_model_dir):
    out = subprocess.run([sys.executable, str(EXAMPLES / "offline_shared_prefix.py"),
                          str(tiny_model_dir)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(re.search(r"KV capacity: ([\d,]+) tokens", out.stdout)[1].replace(",", "")) > 0
    cached = [int(m) for m in re.findall(r"cached prompt tokens: (\d+)/", out.stdout)]
    assert len(cached) == 3 and max(cached) > 0
