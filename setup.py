"""Everything is in pyproject.toml except what it cannot say: the packages found in the source tree plus the
recipes, which live in the top-level configs/ (docs/layout.md) and ship inside the package as `fcmae.configs`, so
that `--config pretrain/tiny` and `fcmae demo` work after a regular (non-editable) install or from a wheel."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["convnextv2*", "fcmae*", "jobs*"]) + ["fcmae.configs"],
    package_dir={"fcmae.configs": "configs"},
    package_data={"fcmae.configs": ["*/*.yaml"]},
)
