"""The README's set-up commands are the ones CI and users run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^TEST_COMMAND='(.+)'$", ci, re.M).group(1)
    readme = (ROOT / "README.md").read_text()
    assert f"\n{command}\n" in readme


def test_readme_main_job_module_exists():
    readme = (ROOT / "README.md").read_text()
    module = re.search(r"&& python -m (hyclora_models[\w.]*)", readme).group(1)
    assert (ROOT / Path(*module.split("."))).with_suffix(".py").exists()
