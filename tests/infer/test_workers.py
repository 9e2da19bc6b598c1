"""The worker-process module stays torch-free (each reader / post-processing process would
otherwise pay ~300 MB for torch it never uses)."""
from __future__ import annotations

import subprocess
import sys


def test_importing_the_worker_module_does_not_import_torch():
    code = ("import sys, nucleiflow.pipeline.infer.workers; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'prefect')); "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
