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


def _keys(prefix, schema):
    for key, value in schema.items():
        yield f"{prefix}.{key}", key
        if isinstance(value, dict):
            yield from _keys(f"{prefix}.{key}", value)


def test_every_accepted_yaml_key_is_documented():
    """Each key the section validators accept (and each model: key) is in the README, written as `key: ...` in a
    YAML example or as `key` in the text; keys dlc refuses as unused are not accepted, so they need no entry."""
    from dlc.compiler.sections import SCHEMAS, UNUSED
    from dlc.compiler.spec import MODEL_KEYS

    text = (ROOT / "README.md").read_text()
    keys = [(f"model.{k}", k) for k in MODEL_KEYS]
    for section, schema in SCHEMAS.items():
        assert re.search(rf"^{section}:", text, re.M), f"no '{section}:' example in the README"
        keys += list(_keys(section, schema))
    missing = [full for full, key in keys
               if not re.search(rf"(?<![\w.-]){re.escape(key)}:|`{re.escape(key)}`", text)]
    assert missing == []
    assert not set(UNUSED) & {full for full, _ in keys}
    for full in UNUSED:  # each refused key is named in the README, with what to use instead
        assert f"`{full.split('.', 1)[1]}`" in text, full
