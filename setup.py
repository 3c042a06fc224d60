"""train/, generate/ and eval/ are top-level folders (product layout) that import as
dpnotes.train, dpnotes.generate and dpnotes.eval: one import scheme, never a bare `eval`."""
from setuptools import find_packages, setup

ROOTS = {"dpnotes": "dpnotes", "dpnotes.train": "train", "dpnotes.generate": "generate", "dpnotes.eval": "eval"}

packages = list(ROOTS)
for name, folder in ROOTS.items():
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

# Data-only folders (no __init__.py): listed as packages so their files ship, e.g. the public
# MIMIC-III top-50 code list read through importlib.resources.
packages += ["dpnotes.corpus.data"]
PACKAGE_DATA = {"dpnotes.corpus.data": ["*.txt", "*.tsv"]}

setup(packages=packages, package_dir=ROOTS, package_data=PACKAGE_DATA)
