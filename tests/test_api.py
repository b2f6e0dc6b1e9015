"""The public surface: small, consistent, clashing with nothing of fastai's; the core is pure PyTorch."""
import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import fastai_freeze

PACKAGE = Path(fastai_freeze.__file__).parent


def test_the_public_api_is_small_and_every_name_exists():
    assert 15 <= len(fastai_freeze.__all__) <= 25
    assert len(set(fastai_freeze.__all__)) == len(fastai_freeze.__all__)
    for name in fastai_freeze.__all__:
        assert getattr(fastai_freeze, name) is not None, name


def test_no_name_clashes_with_fastai_after_both_star_imports():
    code = ("import fastai.vision.all as f; before = {k: v for k, v in vars(f).items() if not k.startswith('_')};"
            "import fastai_freeze as ff; clash = [n for n in ff.__all__ if n in before];"
            "print(clash); assert not clash")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_each_modules_all_is_consistent_with_the_package():
    for info in pkgutil.walk_packages([str(PACKAGE)], "fastai_freeze."):
        if info.name.endswith("__main__"):
            continue
        mod = importlib.import_module(info.name)
        assert hasattr(mod, "__all__"), info.name
        for name in mod.__all__:
            assert hasattr(mod, name), f"{info.name}.{name}"
    for name in fastai_freeze.__all__:
        obj = getattr(fastai_freeze, name)
        home = importlib.import_module(obj.__module__) if hasattr(obj, "__module__") else None
        assert home is None or name in home.__all__, f"{name} is public but not in {obj.__module__}.__all__"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_the_core_imports_nothing_from_fastai_or_matplotlib():
    core = list((PACKAGE / "core").glob("*.py"))
    assert core
    for path in core:
        assert not _imports(path) & {"fastai", "fastcore", "matplotlib"}, path.name
    # and it loads, as a package of its own, where fastai and matplotlib cannot be imported at all
    code = (f"import sys, importlib.util; [sys.modules.__setitem__(m, None) for m in ('fastai', 'fastcore', 'matplotlib')];"
            f"spec = importlib.util.spec_from_file_location('core', r'{PACKAGE / 'core' / '__init__.py'}', "
            f"submodule_search_locations=[r'{PACKAGE / 'core'}']); m = importlib.util.module_from_spec(spec); "
            "sys.modules['core'] = m; spec.loader.exec_module(m); print(len(m.__all__))")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and int(out.stdout) > 10, out.stdout + out.stderr


def test_the_library_does_not_depend_on_its_demo():
    for path in PACKAGE.glob("*.py"):
        if path.name == "__main__.py":  # `python -m fastai_freeze` is the demo's command line
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("demo") and "demo" not in node.module.split("."), path.name


def test_user_facing_text_speaks_of_the_library_not_of_its_source_texts():
    for path in list(PACKAGE.rglob("*.py")) + [PACKAGE.parent / "README.md"]:
        text = path.read_text().lower()
        assert "seed 00" not in text and "seeds/" not in text, path


def _relative_imports(path, mod: str, is_pkg: bool) -> set[str]:
    "The library modules `path` imports (anywhere in it, not under `if TYPE_CHECKING:`)."
    import ast
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only or not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        base = mod if is_pkg else mod.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            base = base.rsplit(".", 1)[0]
        out |= {f"{base}.{node.module}"} if node.module else {f"{base}.{a.name}" for a in node.names}
    return out


def test_no_import_cycle_between_the_library_modules():
    "Each module builds on the ones below it; none imports one that imports it back (lazily or not)."
    import pathlib
    root = pathlib.Path(fastai_freeze.__file__).parent
    graph = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        mod = ".".join(parts[:-1] if is_pkg else parts)
        graph[mod] = _relative_imports(f, mod, is_pkg)
    assert "fastai_freeze.core.bn" in graph["fastai_freeze.freeze"]  # the graph is read
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done or m not in graph:
            return
        path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        path.pop()
        done.add(m)
    for m in sorted(graph):
        visit(m)


def test_fastais_internals_are_used_in_internals_only():
    """The attributes fastai does not document (the optimizer's frozen-group count, a scheduler's
    schedules, private methods of fastai objects) are read or written in `internals.py` alone."""
    import re
    root = Path(fastai_freeze.__file__).parent
    private = re.compile(r"\b(?:learn|opt|sched|recorder|rec|dl|dls|self\.learn|self\.opt)\._[a-z]\w*\(")
    for f in root.rglob("*.py"):
        if f.name == "internals.py":
            continue
        text = f.read_text()
        for name in ("frozen_idx", ".scheds", "_update_val"):
            assert name not in text, f"{f.name} uses fastai's {name}: go through fastai_freeze.internals"
        assert not private.search(text), f"{f.name}: {private.search(text).group(0)}"


def test_fine_tune_with_is_a_short_orchestrator():
    "The steps live in the engine (FineTuneSchedule); the method checks its arguments and runs them."
    import inspect

    from fastai.learner import Learner
    assert len(inspect.getsource(Learner.fine_tune_with).splitlines()) <= 40
    params = list(inspect.signature(Learner.fine_tune_with).parameters)
    assert params[1:5] == ["epochs", "base_lr", "freeze_epochs", "lr_mult"]  # fastai's fine_tune order
    assert "lr_max" not in params and "start_epoch" not in params


def test_the_readme_quick_start_runs_as_written(tmp_path):
    "The README's first python block, as a newcomer pastes it: offline, from any folder, it trains and reports."
    import re
    block = re.search(r"```python\n(.*?)```", (PACKAGE.parent / "README.md").read_text(), re.S).group(1)
    assert "fine_tune_with" in block and "load_fashion_mnist" in block
    code = "import torch; torch.set_num_threads(2)\n" + block + "\nprint('ACC', record.phases[-1].values[-1][-1])"
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "BN policy" in out.stdout or "policy" in out.stdout, out.stdout[-2000:]
    acc = float(out.stdout.rsplit("ACC", 1)[1])
    assert acc > 0.75, acc  # 3000 images, 1+2 epochs: ~0.86 on the real network
