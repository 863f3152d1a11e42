"""Package discovery only; metadata lives in setup.cfg.

``preprocessing/`` (the NVTabular workflows) is installed under the import name
``torchrec_mamba_preprocessing`` so that it never shadows a generic ``preprocessing`` module.
"""

from setuptools import find_packages, setup

core = find_packages(include=["torchrec_mamba", "torchrec_mamba.*"])
etl = ["torchrec_mamba_preprocessing"] + [
    f"torchrec_mamba_preprocessing.{name}" for name in find_packages("preprocessing")
]

setup(
    packages=core + etl,
    package_dir={"torchrec_mamba_preprocessing": "preprocessing"},
)
