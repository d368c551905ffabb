"""Where the configuration files are: ``conf/`` of a source checkout (an editable install), or
the copy installed with the package (``condense/conf`` in a wheel)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]


def find_conf_dir() -> Path:
    """The folder holding ``config.yaml`` and the group folders (``method/``, ``budget/``, ...).

    A wheel installs the repository's ``conf/`` as ``condense/conf`` (pyproject.toml maps it);
    a source checkout or an editable install reads ``conf/`` next to the ``condense/`` package.
    """
    for candidate in (_PACKAGE / "conf", _PACKAGE.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"condense's configuration files are missing: neither {_PACKAGE / 'conf'} nor "
                            f"{_PACKAGE.parent / 'conf'} holds config.yaml; reinstall condense")


CONF_DIR = find_conf_dir()


def group_choices(group: str) -> list[str]:
    """The config files of a group (``method`` -> ``['datadam', 'dc', ...]``)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
