"""setup.cfg holds the metadata; this adds what it cannot say: configs/ ships inside the package as captioner/configs."""
from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["captioner", "captioner.*"]), "captioner.configs"],
      package_dir={"captioner.configs": "configs"}, package_data={"captioner.configs": ["*.yaml"]})
