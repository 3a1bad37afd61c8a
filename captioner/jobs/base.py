"""What every job shares: how a job that trains or reads a dataset gets its config.

Every command is an `XJob` dataclass, built by keyword and checked in `__post_init__` (so a bad value fails
before any work, whoever builds the job: the CLI, a script or a notebook), and run by its module's `main(job)`.
"""
from __future__ import annotations

from pathlib import Path

from captioner.config import Config, load_config
from captioner.errors import CaptionerError


def config_of(cfg: Config | None, path: str | Path | None, overrides, command: str) -> Config:
    """The job's config: cfg as given, else the YAML file at path with `section.key=value` overrides."""
    if cfg is not None:
        if overrides:
            raise CaptionerError(f"{command}: overrides apply to a config file; apply them to the Config given "
                                 f"(config.apply_overrides)")
        return cfg
    if not path:
        raise CaptionerError(f"{command} needs --config FILE (see configs/; e.g. --config tiny.yaml)")
    return load_config(path, list(overrides))
