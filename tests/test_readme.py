"""
The README's examples stay true: its Python example builds a proxy, and
every option and metric name it documents exists.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from faultkit import edgeproxy_env

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_python_example_builds_a_service(tmp_path: Path) -> None:
    """
    The "Using it from your own Twisted application" example runs as
    written (on port 0 instead of 8080) and builds the service tree.
    """
    start = README.index("```python\nfrom twisted.internet import reactor")
    code = README[start + len("```python\n") : README.index("```", start + 10)]
    code = code.replace('ListenerSpec("tcp:8080")', 'ListenerSpec("tcp:0")')
    code += "\nprint(sorted(child.name for child in proxy))\n"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=edgeproxy_env(),
        cwd=str(tmp_path),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "listener-0" in result.stdout and "routing-reload" in result.stdout


def test_every_option_in_the_options_table() -> None:
    """
    Every twistd option has a row in the README's option table.
    """
    from edgeproxy.tap import _OPTIONS

    for option in _OPTIONS:
        assert f"`--{option.name}" in README, option.name
        # (--health-rise and --health-fall share a row: "..._RISE` / `_FALL".)
        env = option.env.replace("EDGEPROXY_HEALTH_FALL", "_FALL")
        assert env in README, option.env


def test_documented_metrics_are_exported() -> None:
    """
    Every edgeproxy_* metric name the README mentions is one the
    collector knows (a family, or a generic counter it says it exports).
    """
    from edgeproxy.control import metrics as module

    source = Path(module.__file__).read_text()
    names = set(re.findall(r"edgeproxy_[a-z0-9_]+", README))
    for name in names - {"edgeproxy_plugin", "edgeproxy_reactor"}:
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        assert base in source, name
