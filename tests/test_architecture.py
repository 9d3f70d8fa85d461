"""The layering of ARCHITECTURE.md, checked on the source: who may import whom, where click
and torch may appear, and that the CLI and the package root stay cheap to import. The
rules live twice, here and in ARCHITECTURE.md's tables, and a test keeps the two equal."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flamingo_cli"

# Layer -> what of ours it may import, besides its own layer (an entry covers a module or a
# whole package). `flamingo_cli` is the package root.
MAY_IMPORT = {
    "flamingo_cli": set(),
    "errors": set(),
    "tiny": set(),
    "model": {"errors"},
    "formats": {"errors", "model"},
    "inference": {"errors", "formats", "model.config"},
    "training": {"errors", "model", "formats", "inference"},
    "evaluation": {"errors", "formats.artifacts"},
    "importers": {"errors", "model", "formats"},
    "cli": {"flamingo_cli", "errors", "model", "formats", "inference", "training", "evaluation", "importers"},
}

HEAVY = {"torch", "torchvision", "transformers", "timm", "webdataset", "safetensors"}

# Rules on other packages, as ARCHITECTURE.md words them -> the modules or layers they cover.
ONLY_CLI_IMPORTS_CLICK = "only these import `click`"
NEVER_TORCH = "never import `torch`, even inside functions"
NO_HEAVY_AT_IMPORT = "import no heavy library at module level"
CHEAP_TO_IMPORT = "load no heavy library when imported (module-level imports, followed through our modules)"
PACKAGE_RULES = {
    ONLY_CLI_IMPORTS_CLICK: {"cli"},
    NEVER_TORCH: {"errors", "formats.presets", "evaluation"},
    NO_HEAVY_AT_IMPORT: {"flamingo_cli", "errors", "tiny", "formats.artifacts", "formats.records", "formats.shards", "formats.hub",
                         "formats.presets", "evaluation", "cli"},
    CHEAP_TO_IMPORT: {"flamingo_cli", "cli"},
}


# -- reading the source ----------------------------------------------------------------

def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = module_files()


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def covers(entry: str, module: str) -> bool:
    """Whether a rule entry (a layer, a module below the package, or `flamingo_cli`) names `module`."""
    name = "flamingo_cli" if entry == "flamingo_cli" else f"flamingo_cli.{entry}"
    return module == name or (entry != "flamingo_cli" and module.startswith(name + "."))


class Imports(ast.NodeVisitor):
    """(imported module, line, at module level) for every import in one module."""

    def __init__(self, module: str, is_package: bool):
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[str, int, bool]] = []
        self.depth = 0

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node):
        for alias in node.names:
            self.found.append((alias.name, node.lineno, self.depth == 0))

    def visit_ImportFrom(self, node):
        if node.level:
            base = self.package.split(".")
            base = ".".join(base[:len(base) - node.level + 1])
            target = f"{base}.{node.module}" if node.module else base
        else:
            target = node.module
        if target.split(".")[0] == "__future__":
            return
        for alias in node.names:
            # `from . import encode` imports a module; `from .. import __version__` a name.
            sub = f"{target}.{alias.name}"
            self.found.append((sub if sub in MODULES else target, node.lineno, self.depth == 0))


def imports_of(module: str) -> list[tuple[str, int, bool]]:
    path = MODULES[module]
    visitor = Imports(module, path.name == "__init__.py")
    visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return visitor.found


IMPORTS = {m: imports_of(m) for m in MODULES}


def where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


def modules_covered(entries) -> list[str]:
    return [m for m in MODULES if any(covers(e, m) for e in entries)]


# -- the rules ---------------------------------------------------------------------------

def layering_violations() -> list[str]:
    problems = []
    for module, found in IMPORTS.items():
        own = layer(module)
        allowed = MAY_IMPORT[own]
        for target, line, _ in found:
            if target.split(".")[0] != "flamingo_cli" or layer(target) == own and target != "flamingo_cli":
                continue
            if not any(covers(entry, target) for entry in allowed):
                problems.append(f"{where(module, line)}: {own} may not import {target} "
                                f"(ARCHITECTURE.md: {own} may import {', '.join(sorted(allowed)) or 'nothing of ours'})")
    return problems


def package_violations() -> list[str]:
    problems = []
    for module, found in IMPORTS.items():
        click_allowed = any(covers(e, module) for e in PACKAGE_RULES[ONLY_CLI_IMPORTS_CLICK])
        for target, line, top in found:
            top_name = target.split(".")[0]
            if top_name == "click" and not click_allowed:
                problems.append(f"{where(module, line)}: imports click, which only the CLI may")
    for module in modules_covered(PACKAGE_RULES[NEVER_TORCH]):
        for target, line, _ in IMPORTS[module]:
            if target.split(".")[0] == "torch":
                problems.append(f"{where(module, line)}: imports torch "
                                f"({', '.join(sorted(PACKAGE_RULES[NEVER_TORCH]))} {NEVER_TORCH})")
    for module in modules_covered(PACKAGE_RULES[NO_HEAVY_AT_IMPORT]):
        for target, line, top in IMPORTS[module]:
            if top and target.split(".")[0] in HEAVY:
                problems.append(f"{where(module, line)}: imports {target} at module level; import it inside "
                                "the function that needs it")
    return problems


def loaded_on_import(module: str) -> dict[str, list[str]]:
    """Heavy libraries that `import module` loads -> the chain of module-level imports that loads it."""
    chains = {module: [module]}
    todo = [module]
    heavy: dict[str, list[str]] = {}
    while todo:
        current = todo.pop()
        parents = [".".join(current.split(".")[:i]) for i in range(1, current.count(".") + 1)]
        for target, line, top in [(p, 0, True) for p in parents] + IMPORTS[current]:
            if not top:
                continue
            if target.split(".")[0] in HEAVY:
                heavy.setdefault(target, chains[current] + [f"{target} ({where(current, line)})"])
            elif target in MODULES and target not in chains:
                chains[target] = chains[current] + [target]
                todo.append(target)
    return heavy


def cheap_import_violations() -> list[str]:
    problems = []
    for module in sorted(PACKAGE_RULES[CHEAP_TO_IMPORT]):
        name = "flamingo_cli" if module == "flamingo_cli" else f"flamingo_cli.{module}"
        for target, chain in loaded_on_import(name).items():
            problems.append(f"import {name} loads {target}: {' -> '.join(chain)}")
    return problems


def test_layers_import_only_the_layers_below_them():
    problems = layering_violations()
    assert not problems, "\n".join(problems)


def test_click_and_heavy_libraries_stay_where_the_rules_allow():
    problems = package_violations()
    assert not problems, "\n".join(problems)


def test_the_cli_and_the_package_root_load_no_heavy_library():
    problems = cheap_import_violations()
    assert not problems, "\n".join(problems)


def test_every_module_is_in_a_layer_the_rules_name():
    assert {layer(m) for m in MODULES} == set(MAY_IMPORT)
    for entries in [*MAY_IMPORT.values(), *PACKAGE_RULES.values()]:
        for entry in entries:
            assert modules_covered([entry]), f"rule entry {entry!r} names no module"


def test_a_broken_rule_is_reported_with_file_line_and_rule(tmp_path, monkeypatch):
    """The checker itself: a model module importing a stage, and formats importing torch."""
    monkeypatch.setitem(IMPORTS, "flamingo_cli.model.masking",
                        [*IMPORTS["flamingo_cli.model.masking"], ("flamingo_cli.inference.media", 3, False)])
    monkeypatch.setitem(IMPORTS, "flamingo_cli.formats.presets", [("torch", 5, True)])
    monkeypatch.setitem(IMPORTS, "flamingo_cli.cli.encode",
                        [*IMPORTS["flamingo_cli.cli.encode"], ("flamingo_cli.formats.checkpoint", 9, True)])
    assert layering_violations() == [
        "flamingo_cli/model/masking.py:3: model may not import flamingo_cli.inference.media "
        "(ARCHITECTURE.md: model may import errors)"]
    assert package_violations() == [
        "flamingo_cli/formats/presets.py:5: imports torch "
        "(errors, evaluation, formats.presets never import `torch`, even inside functions)",
        "flamingo_cli/formats/presets.py:5: imports torch at module level; import it inside the function that needs it"]
    problems = cheap_import_violations()
    assert problems and all(p.startswith("import flamingo_cli.cli loads ") for p in problems)
    assert "flamingo_cli.cli.encode -> flamingo_cli.formats.checkpoint -> torch" in problems[0]


# -- the rules as ARCHITECTURE.md states them ------------------------------------------------

def table(heading: str) -> dict[str, set[str]]:
    """The first table after `heading`: first cell -> the backticked names in the second,
    outside parentheses."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    start = text.index(heading)
    rows = {}
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if set(cells[0]) <= set("-: "):
            continue
        rows[cells[0]] = set(re.findall(r"`([^`]+)`", re.sub(r"\([^)]*\)", "", cells[1])))  # asides aside
    return rows


def test_architecture_md_states_the_same_layering():
    rows = table("### Who imports whom")
    rows.pop("layer", None)
    assert {k.strip("`"): v for k, v in rows.items()} == MAY_IMPORT


def test_architecture_md_states_the_same_package_rules():
    rows = table("### Other packages")
    rows.pop("rule", None)
    assert rows == PACKAGE_RULES


# -- size and the public surface --------------------------------------------------------

def test_no_module_outgrows_one_idea():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert long == {}, "split these modules (ARCHITECTURE.md: about 400 lines at most)"


def test_the_public_names_resolve_lazily_to_the_library():
    code = ("import sys, flamingo_cli\n"
            "heavy = [m for m in ('torch', 'transformers', 'timm') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "names = [n for n in flamingo_cli.__all__ if n != '__version__']\n"
            "assert set(names) <= set(dir(flamingo_cli))\n"
            "for n in names:\n"
            "    value = getattr(flamingo_cli, n)\n"
            "    assert getattr(sys.modules[value.__module__], n) is value, n\n"
            "    assert value.__module__.startswith('flamingo_cli.'), n\n"
            "print(len(names))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) >= 15
    import flamingo_cli

    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        flamingo_cli.nonsense  # noqa: B018


def test_the_readmes_python_generate_is_the_stage(tmp_path):
    """README's `flamingo generate --shots` in Python gives the stage's records, on the bundled model."""
    from flamingo_cli import (generate_records, load_for_inference, load_template, prompt_records,
                              read_records_file)
    from flamingo_cli.formats.checkpoint import BUNDLED_CHECKPOINT

    images = sorted((ROOT / "examples/toy/images").glob("*.png"))[:3]
    queries_file = tmp_path / "queries.jsonl"
    queries_file.write_text("".join(f'{{"id": "{p.stem}", "image": "{p}"}}\n' for p in images))
    shots = str(ROOT / "examples/toy/shots.jsonl")

    model, media = load_for_inference(BUNDLED_CHECKPOINT)
    queries, support = read_records_file(queries_file), read_records_file(shots)
    prompts = prompt_records(load_template("captioning"), queries, support, k=4, method="random", seed=0)
    answers = generate_records(model, prompts, media, num_beams=3)

    r = subprocess.run([sys.executable, "-c", "from flamingo_cli.cli import main; main()", "generate", "-q",
                        "--ckpt", str(BUNDLED_CHECKPOINT), "--shots", shots, str(queries_file)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line) for line in r.stdout.splitlines()] == answers
    assert all(a["output"] for a in answers)


def test_every_subpackage_is_installed():
    """pyproject.toml names packages one by one (the presets ship from stages/), so a new
    subpackage must be added there, or a wheel would leave it out."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert packages <= listed, f"add to pyproject.toml's packages: {', '.join(sorted(packages - listed))}"
