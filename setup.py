"""setup.cfg holds the metadata; this adds what it cannot say: configs/ ships inside the package as captioner/configs.
package_data lives here, not in setup.cfg, because setup()'s keyword would replace setup.cfg's."""
from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["captioner", "captioner.*"]), "captioner.configs"],
      package_dir={"captioner.configs": "configs"},
      package_data={"captioner": ["py.typed"], "captioner.configs": ["*.yaml"]})
