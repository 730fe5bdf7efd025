"""`ray up` for real: deploy/local.yaml run against this machine over SSH (deploy/check_ray_up.py
says what it changes and why), the Serve app deployed with `serve deploy`, one request
served through the OpenAI API with the key, `ray down`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def test_ray_up_serves_a_request_and_ray_down_ends_it():
    done = subprocess.run([sys.executable, str(ROOT / "deploy" / "check_ray_up.py")], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["served_tokens"] == 5 and result["unauthenticated_status"] == 401, result
