"""The README's two commands stay true: CI runs the same install and test command, and the example exists."""

import re

from helpers import ROOT


def readme_commands():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_starts_with_the_two_commands_ci_runs():
    main_job, tests = readme_commands()
    setup = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]"'
    assert main_job.startswith(setup) and tests.startswith(setup)
    example = main_job.split("dlc compile ")[1].strip()
    assert (ROOT / example).is_file()
    ci = (ROOT / ".ci/run").read_text()
    assert "python3 -m venv .venv" in ci and '. .venv/bin/activate' in ci and 'pip install -e ".[dev]"' in ci
    assert tests.endswith("&& pytest") and "\npytest\n" in ci


def test_native_kernels_are_compiled():
    import dlc._C.boxes as native

    assert native.__file__.endswith((".so", ".pyd"))
