"""The Hydra side of configuration: compose ``conf/`` into the plain dict that
:mod:`condense.config` checks and :mod:`condense.pipeline` runs. The only module that composes.

Composition errors (unknown group choice, unknown key) become ONE line naming the bad value and
the valid choices (:func:`one_line`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig, OmegaConf

from condense.cli._conf import CONF_DIR, group_choices
from condense.config import ALL_GROUPS
from condense.errors import ConfigError


def _labels_suffix(labels: Any) -> str:
    """The run folder's part for ``labels=`` (``conf/config.yaml``: ``${condense_labels:${labels}}``)."""
    return "" if labels is None else f"+{labels}"


if not OmegaConf.has_resolver("condense_labels"):
    OmegaConf.register_new_resolver("condense_labels", _labels_suffix)


def to_plain(node: Any) -> Any:
    """An OmegaConf node -> plain dicts/lists, interpolations resolved; anything else unchanged."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def one_line(e: Exception) -> str:
    """Hydra's multi-line composition errors -> one line with the valid choices."""
    text = str(e)
    m = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
    if m and m.group(1) in ALL_GROUPS:
        g, bad = m.group(1), m.group(2)
        return f"unknown {g} {bad!r}; valid choices: {', '.join(group_choices(g))}"
    m = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
    if m:
        return (f"unknown config key {m.group(1)!r}; the valid top-level keys are in conf/config.yaml "
                f"(a key missing from a group's defaults, e.g. a model kwarg, is added with "
                f"+{m.group(1)}=...)")
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def cli_method_keys() -> set[str]:
    """Method fields set on this run's command line (``method.batch_real=32`` -> ``batch_real``);
    empty outside a Hydra run (e.g. the compose API)."""
    from condense.config import method_keys

    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return set()
    return method_keys(task)


@contextmanager
def _conf_search_path() -> Iterator[None]:
    """Hydra initialised on :data:`CONF_DIR` for the block; an outer Hydra (a user's own
    ``@hydra.main`` app) is set aside and restored."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    outer = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            yield
    finally:
        GlobalHydra.instance().hydra = outer


def compose(overrides: list[str], config_name: str = "config") -> dict[str, Any]:
    """``conf/<config_name>.yaml`` composed with command-line ``overrides``, as a plain dict.

    Raises:
        ConfigError: one line naming the bad group choice or key and the valid choices.
    """
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with _conf_search_path():
        try:
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
            return to_plain(cfg)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(one_line(e)) from None


def compose_groups(groups: Mapping[str, str], config_name: str = "config") -> dict[str, Any]:
    """The composition with the given group choices (``{"method": "dm", "budget": "smoke"}``);
    the other groups at their defaults. Used by :func:`condense.distil`."""
    bad = [g for g in groups if g not in ALL_GROUPS]
    if bad:
        raise ConfigError(f"unknown config group(s) {', '.join(bad)}; valid groups: {', '.join(ALL_GROUPS)}")
    for g, choice in groups.items():
        if not isinstance(choice, str) or not re.fullmatch(r"[\w.\-]+", choice):
            raise ConfigError(f"{g} must be the name of a config file in conf/{g}/, got {choice!r}; "
                              f"valid choices: {', '.join(group_choices(g))}")
    return compose([f"{g}={c}" for g, c in groups.items()], config_name)


def argv_overrides(argv: list[str] | None = None) -> list[str]:
    """The ``key=value`` arguments of a command line (flags dropped)."""
    return [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
