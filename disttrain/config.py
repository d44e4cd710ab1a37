"""Where the Hydra configs live, how they are checked, and how tests compose them."""
from __future__ import annotations

import datetime
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


class ConfigError(ValueError):
    """A setting is wrong; the message names the key and what would be valid."""


def _run_id() -> str:
    # torchrun hands every rank the same run id (a uuid under --standalone, the
    # rendezvous id otherwise); a per-rank timestamp would split the run dir.
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    return stamp


if not OmegaConf.has_resolver("disttrain_run_id"):
    OmegaConf.register_new_resolver("disttrain_run_id", _run_id, use_cache=True)


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


def check_config(cfg: DictConfig) -> None:
    """Reject bad training settings before any process group or data is built.

    Component settings (sync.tau, data.num_classes, ...) are checked by the
    component's own constructor, which knows what is valid for it.
    """
    _positive_int(cfg, "train.steps")
    _positive_int(cfg, "train.batch_size")
    _positive_int(cfg, "train.log_every")
    _positive_int(cfg, "train.eval_every", minimum=0)
    if not isinstance(cfg.train.seed, int) or isinstance(cfg.train.seed, bool):
        raise ConfigError(f"train.seed must be an integer, got {cfg.train.seed!r}")
    lr = OmegaConf.select(cfg, "optim.lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ConfigError(f"optim.lr must be a number > 0, got {lr!r}")
    momentum = OmegaConf.select(cfg, "optim.momentum", default=0.0)
    if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ConfigError(f"optim.momentum must be a number in [0, 1), got {momentum!r}")


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config ``python -m disttrain.train OVERRIDES`` would run with (for tests and scripts)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [])
