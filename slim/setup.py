"""One role's install, without the others' packages: the same code as the full install (`cluster` and `edge` here
are links to the repository's), with only what every role needs (cluster/dependencies.py's CORE: the manager, the
broker, the clients and the `cluster` command) and an extra per role:

    pip install -c constraints.lock ./slim              # manager or broker node
    pip install -c constraints.lock './slim[edge]'      # edge node: no torch
    pip install -c constraints.lock './slim[agent]'     # agent node: torch, no FastAPI / gRPC
    pip install -c constraints.lock './slim[all]'       # everything (as `pip install .`)

Install this or the full one in an environment, not both: they hold the same modules."""

import runpy
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
DEPENDENCIES = runpy.run_path(str(HERE / "cluster" / "dependencies.py"))
ROLES = DEPENDENCIES["ROLES"]

setup(
    name="torch-serving-cluster-slim",
    description="torch-serving-cluster for one role: install the extra of the role this machine runs.",
    packages=find_packages(include=["cluster", "cluster.*", "edge", "edge.*"]),
    install_requires=DEPENDENCIES["CORE"],
    extras_require={**ROLES, "all": [requirement for role in ROLES.values() for requirement in role]},
    **DEPENDENCIES["DISTRIBUTION"],
)
