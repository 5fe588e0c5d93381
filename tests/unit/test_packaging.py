"""What ``pip install ray_dyncheck`` (a wheel, not the editable install the tests run from) ships: every
package under ``ray_dyncheck/``. An explicit ``packages = ["ray_dyncheck"]`` ships the top level alone,
and the import of ``ray_dyncheck`` then fails on its first private subpackage."""

from __future__ import annotations

import fnmatch
import pathlib

import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_every_package_is_in_the_wheel():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "packages" in setuptools, "pyproject.toml: [tool.setuptools] lost its package list"
    packages = setuptools["packages"]
    found = sorted(".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ray_dyncheck").rglob("__init__.py")
                   if "__pycache__" not in p.parts)
    assert len(found) > 1
    if isinstance(packages, list):  # listed by name: every package must be there
        missing = [p for p in found if p not in packages]
    else:  # [tool.setuptools.packages.find]: matched by its include patterns
        include = packages["find"].get("include", ["*"])
        missing = [p for p in found if not any(fnmatch.fnmatchcase(p, pattern) for pattern in include)]
    assert not missing, f"pyproject.toml ships without {missing}: list them or use packages.find"
