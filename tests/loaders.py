"""Import the scripts and benchmarks, which are files, not modules of the package."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_DIR = ROOT / "sota-implementations" / "bdpo"


def load_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_script(name: str):
    """``sota-implementations/bdpo/<name>.py`` (its folder on ``sys.path`` for its ``utils``)."""
    if str(SCRIPT_DIR) not in sys.path:
        sys.path.insert(0, str(SCRIPT_DIR))
    return load_file(SCRIPT_DIR / f"{name}.py", name)


def load_benchmark(name: str):
    """``benchmarks/<name>.py``."""
    return load_file(ROOT / "benchmarks" / f"{name}.py", name)
