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
    # Under mpiexec, rank 0's timestamp is shared over MPI.
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    if "PMI_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        from .comm.mpi import _mpi  # mpiexec: rank 0's timestamp names everyone's directory

        return "mpi-" + _mpi().COMM_WORLD.bcast(stamp, root=0)
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
    _positive_int(cfg, "train.checkpoint_every", minimum=0)
    _positive_int(cfg, "train.keep_checkpoints")
    if cfg.train.resume not in ("auto", "never"):
        raise ConfigError(f"train.resume must be auto or never, got {cfg.train.resume!r}")
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


_COMPONENT_GROUPS = ("comm", "data", "model", "optim", "sync")
# Passed by the training loop itself, never set in a config file.
_SUPPLIED_BY_LOOP = {"comm", "input_dim", "num_classes", "params"}


def _accepts(annotation, value) -> bool | None:
    """Whether ``value`` fits ``annotation``; None when the annotation is not one we can judge."""
    import typing

    origin = typing.get_origin(annotation)
    if annotation is typing.Any:
        return True
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        verdicts = [_accepts(a, value) for a in typing.get_args(annotation)]
        return True if any(verdicts) else (None if None in verdicts else False)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return None


def _type_name(annotation) -> str:
    import typing

    args = typing.get_args(annotation)
    if args:
        return " or ".join(_type_name(a) for a in args)
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def check_components(cfg: DictConfig) -> None:
    """Every key of every component group is a parameter of its ``_target_``, with a fitting type.

    Hydra rejects keys missing from the files, but ``+sync.tua=1`` or a
    misspelt key in a user's own yaml would otherwise surface as a TypeError
    deep inside a constructor; a string where a number belongs would surface
    as a comparison error.  Here both name the key.
    """
    import inspect
    import typing

    from hydra.utils import get_method

    for group in _COMPONENT_GROUPS:
        node = cfg.get(group)
        if node is None or "_target_" not in node:
            continue
        try:
            target = get_method(node._target_)
        except Exception as e:  # noqa: BLE001 - hydra raises several kinds
            raise ConfigError(f"{group}._target_={node._target_!r} cannot be imported ({e})") from None
        init = target.__init__ if inspect.isclass(target) else target
        params = inspect.signature(init).parameters
        open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # noqa: BLE001 - unresolvable annotations: skip type checks
            hints = {}
        valid = sorted(k for k in params if k not in ("self", *_SUPPLIED_BY_LOOP)
                       and params[k].kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL))
        for key in node:
            if key.startswith("_") and key.endswith("_"):
                continue
            if key not in params and not open_ended:
                raise ConfigError(f"{group}.{key} is not a setting of {node._target_}; "
                                  f"valid settings: {', '.join(valid)}")
            value = OmegaConf.select(node, key, throw_on_missing=False)
            if key in hints and OmegaConf.is_missing(node, key) is False:
                if _accepts(hints[key], value) is False:
                    raise ConfigError(f"{group}.{key} must be {_type_name(hints[key])}, got {value!r}")
