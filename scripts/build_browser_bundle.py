#!/usr/bin/env python3
"""Build the wheels Pyodide needs to run grpcbridge.browser, into build/browser/.

* a wheel of grpcbridge itself (``pip wheel --no-deps``, built from a clean copy of the tree);
* pure-Python (``py3-none-any``) wheels of grpclib, h2, hpack, hyperframe, multidict and
  protobuf (``pip download --only-binary=:all: --platform any --python-version 3.14``),
  pinned to the versions installed in the running environment, so the browser runs what the
  CPython tests run; protobuf must not be older than the generator of the shipped
  ``_pb2.py`` files (their runtime check would fail);
* ``manifest.json``: wheel file names (load them in this order), versions and a hash of the
  sources.

Idempotent and fast when up to date: nothing is rebuilt unless the sources or the pins
changed (``--force`` rebuilds). Usage: ``python scripts/build_browser_bundle.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYODIDE_PYTHON = "3.14"  # the Python of the npm package pyodide 314.x
#: Pure-Python dependencies of grpcbridge.browser, with the range used when the package is
#: not installed here.
DEPENDENCIES = {
    "hpack": "hpack>=4,<5",
    "hyperframe": "hyperframe>=6,<7",
    "h2": "h2>=4,<5",  # what grpcbridge._grpclib_compat supports
    "multidict": "multidict",
    "grpclib": "grpclib>=0.4,<0.5",
    "protobuf": "protobuf",  # + >= the gencode version, added below
}
PB2_FILES = sorted((ROOT / "src" / "grpcbridge").rglob("*_pb2.py"))
SOURCE_FILES = ("pyproject.toml", "README.md", "LICENSE")


def gencode_version() -> tuple[int, int, int]:
    """The newest protobuf generator version among the shipped ``*_pb2.py`` files."""
    best = (0, 0, 0)
    pattern = re.compile(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*"
        r"(\d+),\s*(\d+),")
    for path in PB2_FILES:
        match = pattern.search(path.read_text())
        if match:
            best = max(best, (int(match[1]), int(match[2]), int(match[3])))
    return best


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def requirements() -> dict[str, str]:
    """Pinned requirement per dependency."""
    gencode = gencode_version()
    result = {}
    for name, fallback in DEPENDENCIES.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if name == "protobuf":
            if installed is not None and version_tuple(installed) < gencode:
                raise SystemExit(
                    f"protobuf {installed} is installed, but the _pb2.py files were generated "
                    f"by protobuf {'.'.join(map(str, gencode))}: install a newer protobuf")
            floor = ".".join(map(str, gencode))
            result[name] = f"protobuf=={installed}" if installed else f"protobuf>={floor}"
        else:
            result[name] = f"{name}=={installed}" if installed else fallback
    return result


def source_hash() -> str:
    digest = hashlib.sha256()
    paths = [ROOT / name for name in SOURCE_FILES]
    paths += sorted(p for p in (ROOT / "src" / "grpcbridge").rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    for path in paths:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"failed: {' '.join(command)}")


def build_grpcbridge_wheel(out: Path) -> str:
    """``pip wheel --no-deps`` of a clean copy of the tree (no stale build/ or egg-info)."""
    for old in out.glob("grpcbridge-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="grpcbridge-wheel-") as tmp:
        copy = Path(tmp) / "src-copy"
        copy.mkdir()
        for name in SOURCE_FILES:
            shutil.copy2(ROOT / name, copy / name)
        shutil.copytree(ROOT / "src" / "grpcbridge", copy / "src" / "grpcbridge",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        wheels = Path(tmp) / "wheels"
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
             "--wheel-dir", str(wheels), str(copy)])
        (built,) = wheels.glob("grpcbridge-*.whl")
        shutil.copy2(built, out / built.name)
        return built.name


def download_dependencies(out: Path, pins: dict[str, str]) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="grpcbridge-deps-") as tmp:
        run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "--platform", "any", "--implementation", "py",
             "--abi", "none", "--python-version", PYODIDE_PYTHON, "--dest", tmp,
             *pins.values()])
        names = []
        for name in pins:
            found = [p for p in Path(tmp).glob("*.whl")
                     if p.name.lower().replace("_", "-").startswith(name.lower() + "-")]
            if len(found) != 1 or not found[0].name.endswith("-none-any.whl"):
                raise SystemExit(f"no pure-Python (py3-none-any) wheel for {pins[name]}: "
                                 f"{[p.name for p in found]}")
            shutil.copy2(found[0], out / found[0].name)
            names.append(found[0].name)
        return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "browser")
    parser.add_argument("--force", action="store_true", help="rebuild everything")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    started = time.monotonic()
    try:
        old = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        old = {}

    pins = requirements()
    sources = source_hash()
    old_wheels = old.get("dependency_wheels", [])
    deps_ok = (not args.force and old.get("requirements") == pins and old_wheels
               and all((out / name).is_file() for name in old_wheels))
    dependency_wheels = old_wheels if deps_ok else download_dependencies(out, pins)
    own = old.get("grpcbridge_wheel")
    own_ok = (not args.force and own and old.get("source_hash") == sources
              and (out / own).is_file())
    grpcbridge_wheel = own if own_ok else build_grpcbridge_wheel(out)

    wheels = [*dependency_wheels, grpcbridge_wheel]
    for stale in out.glob("*.whl"):
        if stale.name not in wheels:
            stale.unlink()
    manifest = {
        "python": PYODIDE_PYTHON,
        "wheels": wheels,
        "grpcbridge_wheel": grpcbridge_wheel,
        "dependency_wheels": dependency_wheels,
        "requirements": pins,
        "protobuf_gencode": ".".join(map(str, gencode_version())),
        "source_hash": sources,
    }
    if manifest != old:
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    state = "up to date" if deps_ok and own_ok else "built"
    print(f"browser bundle {state} in {time.monotonic() - started:.1f} s: {out} "
          f"({len(wheels)} wheels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
