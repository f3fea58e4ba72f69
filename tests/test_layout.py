"""The project's layout: its code stays on the public API of the frameworks it builds on, and the wheel installs
the package mnist_adder and two of the design card's three modules (cli.py is a script of the clone), nothing
else."""

import ast
import importlib
import inspect
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from functools import cache
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL_FILES = ["lightning_module.py", "datamodule.py", "cli.py", "demo.py", "export.py"]

# The packages whose private names our code must not use (lightning's sibling distributions with them).
FRAMEWORKS = {
    "lightning",
    "lightning_fabric",
    "lightning_utilities",
    "pytorch_lightning",
    "torch",
    "torchmetrics",
    "jsonargparse",
    "torchvision",
}
# Public modules in name only: Lightning's own internals, which may change in any release.
INTERNAL_MODULES = ("lightning.pytorch.overrides", "pytorch_lightning.overrides")
# The one exception, named here rather than skipped: namedtuple's documented API, whose names start with "_" only
# to stay clear of field names (typing.NamedTuple's Losses._fields, SplitLogits._asdict()).
NAMEDTUPLE_API = {"_asdict", "_fields", "_field_defaults", "_make", "_replace"}
ATTRIBUTE_FUNCTIONS = {"getattr", "setattr", "delattr"}  # getattr(x, "_name") reads x._name all the same


class Offence(NamedTuple):
    path: str
    line: int
    name: str
    kind: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.name} ({self.kind})"


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def is_framework(dotted: str | None) -> bool:
    return dotted is not None and dotted.split(".")[0] in FRAMEWORKS


def is_internal(dotted: str) -> bool:
    return any(dotted == module or dotted.startswith(module + ".") for module in INTERNAL_MODULES)


def module_name(path: str) -> str:
    parts = list(Path(path).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_object(dotted: str):
    """The object a dotted path names, importing the longest module prefix it starts with."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"cannot import {dotted}")


@cache
def private_members(cls: type) -> frozenset[str]:
    """The private names a framework class and its framework ancestors define: class attributes and methods, and the
    instance attributes their methods assign (self._x = ...), read from their source."""
    names = set()
    for klass in cls.__mro__:
        if not is_framework(klass.__module__):
            continue
        names |= {name for name in [*vars(klass), *vars(klass).get("__annotations__", {})] if is_private(name)}
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # compiled, or no source shipped: its vars are all there is
            continue
        names |= {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
            and is_private(node.attr)
        }
    return frozenset(names)


class Module:
    """One parsed source file: the names its imports bind (to dotted paths) and the classes it defines."""

    def __init__(self, path: str, source: str):
        self.path, self.name = path, module_name(path)
        self.package = self.name if path.endswith("__init__.py") else self.name.rpartition(".")[0]
        self.tree = ast.parse(source, filename=path)
        self.bindings: dict[str, str] = {}
        self.classes: dict[str, ast.ClassDef] = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        self.bindings[alias.asname] = alias.name
                    else:
                        root = alias.name.split(".")[0]
                        self.bindings[root] = root
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    self.bindings[alias.asname or alias.name] = f"{self.import_base(node)}.{alias.name}"
            elif isinstance(node, ast.ClassDef):
                self.classes.setdefault(node.name, node)

    def import_base(self, node: ast.ImportFrom) -> str:
        """The absolute module an ImportFrom imports from (relative ones resolved against this module's package)."""
        if not node.level:
            return node.module
        base = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
        return ".".join([*base, *([node.module] if node.module else [])])

    def dotted(self, expr: ast.expr) -> str | None:
        """The dotted path an expression names through this module's imports and classes, if it names one."""
        if isinstance(expr, ast.Name):
            if expr.id in self.bindings:
                return self.bindings[expr.id]
            return f"{self.name}.{expr.id}" if expr.id in self.classes else None
        if isinstance(expr, ast.Attribute):
            base = self.dotted(expr.value)
            return f"{base}.{expr.attr}" if base else None
        return None


class Checker:
    """Finds, in a set of source files, every use of a private name of the frameworks and of other objects."""

    def __init__(self, sources: dict[str, str]):
        self.modules = {module.name: module for module in (Module(path, text) for path, text in sources.items())}
        self.offences: list[Offence] = []

    def framework_bases(self, dotted: str, seen: frozenset = frozenset()) -> list[type]:
        """The framework classes a class (by dotted path) derives from: imported for real, or, through our own
        classes in the sources checked, found in their bases in turn."""
        if is_framework(dotted):
            return [import_object(dotted)]
        module_path, _, class_name = dotted.rpartition(".")
        module = self.modules.get(module_path)
        if module is None or class_name not in module.classes or dotted in seen:
            return []
        found = []
        for base in module.classes[class_name].bases:
            if base_path := module.dotted(base):
                found += self.framework_bases(base_path, seen | {dotted})
        return found

    def check(self) -> list[Offence]:
        for module in self.modules.values():
            self.visit(module, module.tree, frozenset())
        return sorted(set(self.offences))

    def flag(self, module: Module, node: ast.AST, name: str, kind: str) -> None:
        self.offences.append(Offence(module.path, node.lineno, name, kind))

    def check_import_path(self, module: Module, node: ast.AST, dotted: str) -> None:
        if not is_framework(dotted):
            return
        if any(is_private(part) for part in dotted.split(".")):
            self.flag(module, node, dotted, "private framework module or name imported")
        elif is_internal(dotted):
            self.flag(module, node, dotted, "Lightning-internal module imported")

    def check_attribute(self, module: Module, node: ast.AST, obj: ast.expr, attr: str, privates: frozenset) -> None:
        """`obj.attr`: `privates` are the framework's private names that the enclosing class inherits."""
        own = (isinstance(obj, ast.Name) and obj.id in ("self", "cls")) or (
            isinstance(obj, ast.Call) and isinstance(obj.func, ast.Name) and obj.func.id == "super"
        )
        base = module.dotted(obj)
        if base and is_internal(f"{base}.{attr}") and not is_internal(base):  # flagged where the chain enters it
            self.flag(module, node, f"{base}.{attr}", "Lightning-internal module used")
        if not is_private(attr):
            return
        if own:
            if attr in privates:
                self.flag(module, node, f"{ast.unparse(obj)}.{attr}", "private member of a framework base class")
        elif is_framework(base):
            self.flag(module, node, f"{base}.{attr}", "private framework attribute")
        elif attr not in NAMEDTUPLE_API:
            self.flag(module, node, f"{ast.unparse(obj)}.{attr}", "private attribute of another object")

    def visit(self, module: Module, node: ast.AST, privates: frozenset) -> None:
        if isinstance(node, ast.ClassDef):
            privates = frozenset()
            for base in node.bases:
                if base_path := module.dotted(base):
                    for cls in self.framework_bases(base_path):
                        privates |= private_members(cls)
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name in privates:
                    self.flag(module, item, f"{node.name}.{item.name}", "overrides a private framework method")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                self.check_import_path(module, node, alias.name)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            for alias in node.names:
                self.check_import_path(module, node, f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Attribute):
            self.check_attribute(module, node, node.value, node.attr, privates)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute):
            func = ast.unparse(node.func)
            text = node.args[1].value if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) else None
            if func in ATTRIBUTE_FUNCTIONS and isinstance(text, str):
                self.check_attribute(module, node, node.args[0], text, privates)
            first = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
            if func in ("importlib.import_module", "import_module", "__import__") and isinstance(first, str):
                self.check_import_path(module, node, first)
        for child in ast.iter_child_nodes(node):
            self.visit(module, child, privates)


def find_private_uses(sources: dict[str, str]) -> list[Offence]:
    """`sources`: file path (relative to the repository, which gives the module's name) to its text."""
    return Checker(sources).check()


def project_sources() -> dict[str, str]:
    files = sorted((ROOT / "mnist_adder").rglob("*.py")) + [ROOT / name for name in TOP_LEVEL_FILES]
    return {file.relative_to(ROOT).as_posix(): file.read_text() for file in files}


def test_project_uses_no_private_framework_names():
    sources = project_sources()
    assert len(sources) > len(TOP_LEVEL_FILES) + 3 and "mnist_adder/run/checkpoints.py" in sources
    offences = find_private_uses(sources)
    assert not offences, "private names used:\n" + "\n".join(map(str, offences))


# The benchmarks' private torch names, each where it measures what no public name reaches: the operations torch
# dispatches per step (bench.py), and SGD's update as a CUDA graph captures it (static_step.py).
BENCHMARK_PRIVATE_NAMES = {
    ("benchmarks/bench.py", "torch.utils._python_dispatch.TorchDispatchMode"),
    *(("benchmarks/static_step.py", f"torch._foreach_{op}") for op in ("add", "mul_", "add_", "addcmul", "addcmul_")),
}


def test_benchmarks_use_no_private_framework_names_but_the_known_ones():
    sources = {f.relative_to(ROOT).as_posix(): f.read_text() for f in sorted((ROOT / "benchmarks").glob("*.py"))}
    assert {(offence.path, offence.name) for offence in find_private_uses(sources)} == BENCHMARK_PRIVATE_NAMES


CHECKER_SNIPPETS = {
    "pkg/__init__.py": "",
    "pkg/base.py": """\
from lightning.pytorch.callbacks import ModelCheckpoint


class OurCheckpoint(ModelCheckpoint):
    pass
""",
    "pkg/bad.py": """\
import importlib
import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F
from lightning.pytorch.loops.fit_loop import _FitLoop
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import _C
from lightning.pytorch.callbacks import ModelCheckpoint
from .base import OurCheckpoint


class Direct(ModelCheckpoint):
    def on_validation_end(self, trainer, pl_module):
        self._save_last_checkpoint(trainer, {})
        super()._save_topk_checkpoint(trainer, {})
        return self._last_global_step_saved

    def _monitor_candidates(self, trainer):
        return {}


class Inherited(OurCheckpoint):
    def on_train_end(self, trainer, pl_module):
        self._save_last_checkpoint(trainer, {})


def reach(trainer, x):
    torch._foreach_add([x], [x])
    F._something(x)
    trainer.strategy._launcher
    getattr(torch, "_dynamo")
    importlib.import_module("torch._dynamo")
    import lightning

    return lightning.pytorch.overrides.distributed
""",
    "pkg/good.py": """\
from typing import NamedTuple

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint


class Pair(NamedTuple):
    a: int
    b: int


class Ours(ModelCheckpoint):
    def __init__(self):
        super().__init__()
        self._mine = 1

    def _helper(self):
        return self._mine, super().__repr__(), self.__class__, type(self).__name__


def fine(x):
    return torch.__version__, F.relu(x), Pair(1, 2)._asdict(), Pair._fields, getattr(x, "shape")
""",
}


def test_checker_catches_each_kind_of_offence():
    offences = {(o.path, o.line, o.name, o.kind) for o in find_private_uses(CHECKER_SNIPPETS)}
    bad = "pkg/bad.py"
    assert offences == {
        # (i) private modules and names imported, and Lightning's internal overrides
        (bad, 3, "torch._functorch.config", "private framework module or name imported"),
        (bad, 5, "lightning.pytorch.loops.fit_loop._FitLoop", "private framework module or name imported"),
        (
            bad,
            6,
            "lightning.pytorch.overrides.distributed.UnrepeatedDistributedSampler",
            "Lightning-internal module imported",
        ),
        (bad, 7, "torch._C", "private framework module or name imported"),
        # (iii) a framework base class's private members, through self and super(), also overridden, also
        # through a class of our own in another module
        (bad, 14, "self._save_last_checkpoint", "private member of a framework base class"),
        (bad, 15, "super()._save_topk_checkpoint", "private member of a framework base class"),
        (bad, 16, "self._last_global_step_saved", "private member of a framework base class"),  # set in __init__
        (bad, 18, "Direct._monitor_candidates", "overrides a private framework method"),
        (bad, 24, "self._save_last_checkpoint", "private member of a framework base class"),
        # (ii) private attributes of the frameworks' modules, also by getattr; (i) by importlib
        (bad, 28, "torch._foreach_add", "private framework attribute"),
        (bad, 29, "torch.nn.functional._something", "private framework attribute"),
        (bad, 31, "torch._dynamo", "private framework attribute"),
        (bad, 32, "torch._dynamo", "private framework module or name imported"),
        # (iv) another object's private attribute
        (bad, 30, "trainer.strategy._launcher", "private attribute of another object"),
        # Lightning's internal overrides, reached as an attribute
        (bad, 35, "lightning.pytorch.overrides", "Lightning-internal module used"),
    }


def copy_for_build(dest: Path) -> None:
    """The repository without what the build must not see or would be slow to copy: venv, data, logs, earlier
    builds. The build then leaves its build/ and *.egg-info here, not in the repository."""
    top_level_skipped = {".git", ".venv", "data", "lightning_logs", "build", "dist", ".pytest_cache", ".ruff_cache"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = {name for name in names if name == "__pycache__" or name.endswith(".egg-info")}
        return skipped | (top_level_skipped & set(names) if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, dest, ignore=ignore)


def test_wheel_installs_the_package_and_the_model_and_data_modules(tmp_path, record_property):
    start, before = time.perf_counter(), {p.name for p in ROOT.iterdir()}
    source, out = tmp_path / "src", tmp_path / "dist"
    copy_for_build(source)
    out.mkdir()
    build = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", build, str(out)], cwd=source, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        files = zf.namelist()
        (top_level_txt,) = [name for name in files if name.endswith(".dist-info/top_level.txt")]
        declared = set(zf.read(top_level_txt).decode().split())
    installed = {name.split("/")[0].removesuffix(".py") for name in files if ".dist-info/" not in name}
    print(f"wheel {wheel.name}: top_level.txt {sorted(declared)}, files' top-level names {sorted(installed)}")
    record_property("wheel_top_level", sorted(installed))
    expected = {"mnist_adder", "datamodule", "lightning_module"}  # cli.py needs the clone's configs/: a script
    assert declared == expected and installed == expected
    for sub in ("model", "data", "run"):
        assert f"mnist_adder/{sub}/__init__.py" in files
    package = {file.relative_to(ROOT).as_posix() for file in (ROOT / "mnist_adder").rglob("*.py")}
    assert package <= set(files), f"not in the wheel: {sorted(package - set(files))}"
    assert {p.name for p in ROOT.iterdir()} <= before, "the build left files in the repository"
    print(f"built and checked in {time.perf_counter() - start:.1f} s")
