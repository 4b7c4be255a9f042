"""README.md and docs/ stay true: the example runs, commands name real flags, links resolve."""

import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
PACKAGES = ("keras_localrank", "experiments", "compress")


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "klr.local_rank(model, x)" in b)
    assert len(example.strip().splitlines()) <= 12
    exec(compile(example, "README.md", "exec"), {})
    assert "dense" in capsys.readouterr().out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_stand_alone_and_links_resolve(page):
    text = page.read_text()
    for outside in ("../shared", "DESIGN.md", "/work/"):
        assert outside not in text, f"{page.name} cites {outside!r}, which a clone does not have"
    links = re.findall(r"\]\(([^)#\s]+)\)", text)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    for link in local:
        assert (page.parent / link).exists(), f"{page.name}: broken link {link}"


def _source_file(module: str, *, run: bool = True) -> pathlib.Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # `from package.module import name`: not a module
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    if run and spec.submodule_search_locations:  # `python -m package` runs __main__.py
        main = pathlib.Path(spec.origin).with_name("__main__.py")
        return main if main.exists() else pathlib.Path(spec.origin)
    return pathlib.Path(spec.origin)


def _defined_flags(module: str) -> set[str]:
    """absl flags defined by `module` and the project modules it imports (read, not run)."""
    seen, flags, todo = set(), set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _source_file(name, run=name == module)
        if path is None:
            continue
        text = path.read_text()
        flags |= set(re.findall(r"DEFINE_\w+\(\s*[\"'](\w+)[\"']", text))
        for base, names in re.findall(r"^\s*from\s+([\w.]+)\s+import\s+\(?([\w, ]+)", text, re.M):
            if base.split(".")[0] in PACKAGES:
                todo += [base] + [f"{base}.{n.strip()}" for n in names.split(",") if n.strip()]
        todo += [m for m in re.findall(r"^\s*import\s+([\w.]+)", text, re.M)
                 if m.split(".")[0] in PACKAGES]
    return flags


def test_readme_commands_name_real_modules_and_flags():
    text = README.read_text().replace("\\\n", " ")
    commands = re.findall(r"python -m ([\w.]+)((?:\s+--\w+(?:=\S+)?)*)", text)
    modules = {module for module, _ in commands}
    assert {"keras_localrank", "pytest", "experiments.gaussian_mlp"} <= modules
    for module, args in commands:
        if module == "pytest":
            continue
        assert _source_file(module) is not None, f"README runs a missing module {module}"
        defined = _defined_flags(module)
        for flag in re.findall(r"--(\w+)", args):
            assert flag in defined, f"`python -m {module}` has no flag --{flag}"
