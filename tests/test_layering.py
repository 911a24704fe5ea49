"""The package's import graph, read from the source: no cycles, every import pointing down the layers.

Layers, from the command line down to the math (a module may import its own package's
modules and anything in a lower layer, never a higher one or a sibling package of its layer):

    8 cli  >  7 pipelines  >  6 factorize, distill, export  >  5 plan, data  >  4 models
      >  3 io, measure  >  2 nn  >  1 decompose, recipe, device  >  0 errors, _version

Imports inside functions are allowed only for optional third-party packages. The two
registries that import by name (the CLI's commands, the model families) are checked to name
modules that exist and sit where the layering allows.

The model-family seam stays closed: no module of `pipelines/` or `cli/` branches on a family's or
a task's name (or on which kind of data config a model has); that is asked of `models/` (the
family, its `Task`) and `data.modality`. And the pipelines share code through one home,
`pipelines/common/`: no command's module imports another's.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lowrank_cli"
RANKS = {
    "lowrank_cli._version": 0, "lowrank_cli.errors": 0,
    "lowrank_cli.decompose": 1, "lowrank_cli.recipe": 1, "lowrank_cli.device": 1,
    "lowrank_cli.nn": 2,
    "lowrank_cli.io": 3, "lowrank_cli.measure": 3,
    "lowrank_cli.models": 4,
    "lowrank_cli.plan": 5, "lowrank_cli.data": 5,
    "lowrank_cli.factorize": 6, "lowrank_cli.distill": 6, "lowrank_cli.export": 6,
    "lowrank_cli.pipelines": 7,
    "lowrank_cli.cli": 8,
    "lowrank_cli.__main__": 9,
    "lowrank_cli": 10,  # the public facade (lazy re-exports): nothing inside the package imports it
}
OPTIONAL_THIRD_PARTY = {"onnx", "onnxruntime", "sklearn", "transformers", "tokenizers", "pyarrow", "datasets"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> tuple[str, int]:
    """(the layer's name, its rank): the longest prefix of `module` in RANKS."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in RANKS:
            return key, RANKS[key]
    raise AssertionError(f"{module} is in no layer: add it to RANKS")


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import statement of a file."""
    tree = ast.parse(path.read_text(), str(path))
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                assert child.level == 0, f"{path}:{child.lineno}: relative import"
                for alias in child.names:  # `from pkg import sub` imports the module pkg.sub when there is one
                    sub = f"{child.module}.{alias.name}"
                    out.append((sub if sub in MODULES else child.module, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return out


GRAPH = {m: [(t, line, fn) for t, line, fn in imports_of(p)] for m, p in MODULES.items()}


def test_every_module_is_in_a_layer():
    for m in MODULES:
        layer_of(m)


def test_imports_point_down_the_layers():
    bad = []
    for m, edges in GRAPH.items():
        layer, rank = layer_of(m)
        for target, line, _ in edges:
            if not target.startswith("lowrank_cli"):
                continue
            t_layer, t_rank = layer_of(target)
            if t_layer == layer:
                continue
            if t_rank >= rank:
                bad.append(f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}: {m} (layer {rank}) imports {target} (layer {t_rank})")
    assert not bad, "imports pointing up or sideways:\n" + "\n".join(bad)


def test_no_import_cycles():
    internal = {m: sorted({t for t, _, _ in edges if t in MODULES and t != m}) for m, edges in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in internal[m]:
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                walk(t)
        stack.pop()
        state[m] = 2

    for m in internal:
        if m not in state:
            walk(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_inside_functions_are_optional_third_party_only():
    bad = [
        f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}: {target}"
        for m, edges in GRAPH.items()
        for target, line, in_function in edges
        if in_function and target.split(".")[0] not in OPTIONAL_THIRD_PARTY
    ]
    assert not bad, "imports inside functions:\n" + "\n".join(bad)


def test_the_name_registries_point_to_modules_where_the_layers_allow():
    from lowrank_cli import _EXPORTS
    from lowrank_cli.cli.app import COMMANDS
    from lowrank_cli.models.family import FAMILIES

    for name, (module, _) in COMMANDS.items():
        assert f"lowrank_cli.cli.commands.{module}" in MODULES, name
    for name, module in FAMILIES.items():
        assert module in MODULES and layer_of(module)[0] == "lowrank_cli.models", name
    for name, module in _EXPORTS.items():
        assert module in MODULES, name
        assert name in MODULES[module].read_text(), (name, module)
    # only these three places import by name
    users = sorted(module_name(p) for p in MODULES.values() if "importlib.import_module" in p.read_text())
    assert users == ["lowrank_cli", "lowrank_cli.cli.app", "lowrank_cli.models.family"]


@pytest.mark.parametrize("argv", [["--version"], ["--help"], []])
def test_version_and_help_import_neither_torch_nor_timm(argv):
    code = (
        "import sys\nfrom lowrank_cli.cli.app import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'numpy', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-500:]


# -- the model-family seam -----------------------------------------------------------------------

SEAM_CLOSED = ("lowrank_cli.pipelines", "lowrank_cli.cli")
DATA_KINDS = {"ImageConfig", "TextConfig", "ImageData", "TextData"}  # what `data.modality` dispatches on
SHARED_HOME = "lowrank_cli.pipelines.common"


def seam_names() -> tuple[set[str], set[str]]:
    """(the family names, the task names) of the registries."""
    from lowrank_cli.models.family import FAMILIES
    from lowrank_cli.models.tasks import TASKS

    return set(FAMILIES), set(TASKS)


def branches_in(source: str, where: str = "<source>") -> list[str]:
    """Where `source` branches on a family or task name, or on a model's kind of data: a comparison (or `in`, or a match
    case) with a family's or task's name, any other mention of a task's name (a dict keyed by tasks), or an isinstance
    check against a data config or a data set's class. Docstrings are not code and are skipped."""
    families, tasks = seam_names()
    tree = ast.parse(source, where)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found: dict[int, str] = {}  # line -> the first reason (a comparison before the names in it)

    def names(node: ast.AST) -> set[str]:
        return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and names(node) & (families | tasks):
            found.setdefault(node.lineno, f"compares with {sorted(names(node) & (families | tasks))}")
        elif isinstance(node, ast.match_case) and names(node.pattern) & (families | tasks):
            found.setdefault(node.pattern.lineno, f"a match case on {sorted(names(node.pattern) & (families | tasks))}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance" and len(node.args) == 2
              and {n.id if isinstance(n, ast.Name) else getattr(n, "attr", None) for n in ast.walk(node.args[1])} & DATA_KINDS):
            found.setdefault(node.lineno, "isinstance on a kind of data")
        elif isinstance(node, ast.Constant) and node.value in tasks and id(node) not in docstrings:
            found.setdefault(node.lineno, f"names the task {node.value!r}")
    return [f"{where}:{line}: {why}" for line, why in sorted(found.items())]


def test_the_branch_scanner_finds_each_kind_of_branch():
    snippets = ['if family.name == "transformers":\n    pass', 'if manifest.family != "timm":\n    pass',
                'ok = task in ("classification", "image-classification")', 'PRIMARY = {"causal-lm": "log-perplexity"}',
                'if isinstance(cfg, TextConfig):\n    pass', 'x = isinstance(data, family.ImageData)',
                'match task:\n    case "features":\n        pass']
    for code in snippets:
        assert branches_in(code), code
    assert not branches_in('"""Text models (`causal-lm`) and timm\'s."""\nfamily = get_family("timm")\nif task.labels:\n    pass')


def test_no_family_or_task_branches_in_pipelines_or_cli():
    bad = [hit for m, p in MODULES.items() if m.startswith(SEAM_CLOSED)
           for hit in branches_in(p.read_text(), str(p.relative_to(PACKAGE.parent)))]
    assert not bad, ("what depends on a model's family or task belongs behind the seam (a ModelFamily method, a Task's "
                     "attribute, data.modality):\n" + "\n".join(bad))


def test_pipeline_modules_share_code_only_through_the_shared_home():
    bad = []
    for m, edges in GRAPH.items():
        if not m.startswith("lowrank_cli.pipelines."):
            continue
        in_home = m == SHARED_HOME or m.startswith(SHARED_HOME + ".")
        for target, line, _ in edges:
            if not target.startswith("lowrank_cli.pipelines") or target == m:
                continue
            if not (target == SHARED_HOME or target.startswith(SHARED_HOME + ".")) or target == "lowrank_cli.pipelines":
                where = "the shared home" if in_home else "a command's module"
                bad.append(f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}: {where} {m} imports {target}")
    assert not bad, f"pipeline modules import one another only through {SHARED_HOME}:\n" + "\n".join(bad)


def test_every_package_is_listed_in_pyproject():
    """A folder of modules missing from pyproject.toml's package list is left out of a (non-editable) install, which the
    tests, run from the source tree, would not notice."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = (root / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(lowrank_cli(?:\.[a-z_]+)*)"', text.split("[tool.setuptools]", 1)[1].split("[tool.setuptools.package-dir]")[0]))
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "lowrank_cli").rglob("__init__.py")}
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
