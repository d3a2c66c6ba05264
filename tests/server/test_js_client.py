"""The JS ``@fal-ai/client`` (1.10.1) through ``requestMiddleware`` (spec 8.3 option 1), when it is installed.

Runs ``js/fal_client_check.mjs`` with node; needs ``NEMOTRON_FAST_JS_CLIENT_DIR`` pointing at a directory where
``npm install @fal-ai/client@1.10.1`` was run (skipped otherwise).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .fakes import FakePipeline
from .test_acceptance_fal_client import png

JS_DIR = os.environ.get("NEMOTRON_FAST_JS_CLIENT_DIR", "")


@pytest.mark.skipif(not (JS_DIR and shutil.which("node") and
                         (Path(JS_DIR) / "node_modules" / "@fal-ai" / "client").is_dir()),
                    reason="set NEMOTRON_FAST_JS_CLIENT_DIR to a dir with @fal-ai/client@1.10.1 installed")
def test_js_client_subscribe_stream_upload_run(start_server: Any, tmp_path: Path) -> None:
    server = start_server(FakePipeline(block_delay=0.02), allow_private_urls=False)
    script = Path(JS_DIR) / "nemotron_fast_check.mjs"
    shutil.copy(Path(__file__).parent / "js" / "fal_client_check.mjs", script)
    env = {**os.environ, "BASE": server.url, "PNG_B64": base64.b64encode(png(1)).decode()}
    out = subprocess.run(["node", str(script)], env=env, capture_output=True, text=True, timeout=120, cwd=JS_DIR)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith('subscribe "echo: he" has-id') and int(lines[0].split()[-1]) > 0
    assert 'subscribe-streaming "echo: he"' in lines and "upload true" in lines and 'run "echo: he"' in lines
    assert 'stream-done "echo: he"' in lines
    assert lines[-1] == 'error 422 ValidationError ["body","prompt"]'
