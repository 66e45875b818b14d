"""``optsurvey fit | validate | test``: Lightning's CLI over any ``LightningModule`` and ``LightningDataModule``.

``model: class_path: ...`` (``ClassifierModule`` and ``DigitsDataModule`` when none is named), so YAML configs
with ``class_path`` work for the user's classes, our callbacks, optimizers and strategies. What this adds to
``LightningCLI``:

- **Errors before work are one line** (``optsurvey fit: error: trainer.callbacks[0] (HessianSpectrum): ...``,
  exit 2), and nothing is created before the whole config is valid: the MLflow loggers are built only
  after the model, the data, the callbacks and the Trainer (an ``MLFlowLogger`` creates its database when
  it is built), so a bad config leaves no empty ``mlflow.db`` or experiment behind.
- **The tracking server is checked first**, and an ``MLFlowLogger`` whose ``tracking_uri`` is a server logs
  to the local outbox (``--outbox``) instead; the run is delivered in the background when the command ends
  (waiting at most ``--sync-wait`` seconds, then one message with the ``optsurvey sync`` command). Training
  never waits on the network; ``time/train_seconds`` is the time ``fit`` took.
- **Defaults where they matter**: :class:`~lightning_optsurvey.callbacks.OptimizerLoopAdapter` (what
  registry optimizers need from the loop), :class:`~lightning_optsurvey.callbacks.DivergenceMonitor`
  (a non-finite loss is reported, and the MLflow run tagged ``diverged``) and
  :class:`~lightning_optsurvey.callbacks.ResumeRNG` (exact resume with random layers) are attached unless
  the config already has one of each.
- The resolved config is saved as an MLflow artifact when the logger is an ``MLFlowLogger`` (Lightning's own
  ``SaveConfigCallback`` needs a ``log_dir``, which a remote tracking URI does not have).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from typing import Any

from lightning_optsurvey.cli._common import DEFAULT_TRACKING_URI, CLIError, add_outbox_arguments
from lightning_optsurvey.cli.preflight import check_outbox, check_tracking_uri

COMMANDS = ("fit", "validate", "test")


def add_parsers(sub: Any) -> None:
    """The delegated sub-commands; their arguments are Lightning's (``optsurvey fit --help``)."""
    for name in COMMANDS:
        p = sub.add_parser(name, add_help=False,
                           help=f"Lightning's `{name}` over your LightningModule/LightningDataModule "
                                "(model.class_path, data.class_path) or ClassifierModule and DigitsDataModule "
                                f"(optsurvey {name} --help)")
        p.add_argument("lightning_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def _own_options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``--outbox`` and ``--sync-wait`` (ours), and the arguments left for LightningCLI, in order."""
    parser = argparse.ArgumentParser(prog=f"optsurvey {argv[0]}", add_help=False)
    add_outbox_arguments(parser)
    own, rest = parser.parse_known_args(argv[1:])
    return own, [argv[0], *rest]


def _class_paths(argv: list[str]) -> dict[str, str]:
    """The ``model`` / ``data`` class paths that ``argv`` (its ``--config`` files, then flags) chooses."""
    import yaml

    found: dict[str, str] = {}
    for i, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        if not value and i + 1 < len(argv):
            value = argv[i + 1]
        if key in ("-c", "--config") and os.path.isfile(value):
            with open(value) as f:
                config = yaml.safe_load(f) or {}
            for section in ("model", "data"):
                entry = config.get(section) if isinstance(config, dict) else None
                if isinstance(entry, dict) and isinstance(entry.get("class_path"), str):
                    found[section] = entry["class_path"]
                elif isinstance(entry, str):
                    found[section] = entry
        for section in ("model", "data"):
            if key in (f"--{section}", f"--{section}.class_path") and value and not value.startswith("-"):
                found[section] = value
    return found


def _check_fit_classes(argv: list[str]) -> None:
    """One-line errors for a ``model``/``data`` class that does not import or is not a Lightning class.

    A module builds its own optimizer in ``configure_optimizers`` here; only ``optsurvey compare``'s grid needs
    an ``optimizer`` argument to pass registry names through.
    """
    from lightning.pytorch import LightningDataModule, LightningModule

    from lightning_optsurvey import user_classes as uc

    paths = _class_paths(argv)
    try:
        if "." in paths.get("model", "") or ":" in paths.get("model", ""):
            uc.load_class(paths["model"], LightningModule, "model.class_path")
        if "." in paths.get("data", "") or ":" in paths.get("data", ""):
            uc.load_class(paths["data"], LightningDataModule, "data.class_path")
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from None


def run(argv: list[str]) -> int:
    """Run ``optsurvey fit|validate|test ARGS...`` (``argv[0]`` is the sub-command); the exit code."""
    own, argv = _own_options(argv)
    try:
        _check_fit_classes(argv)
    except CLIError as err:
        print(f"optsurvey {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except Exception:  # an unreadable config: the parser below reports it in one line
        pass
    try:
        return _lightning_cli(argv, own)
    except CLIError as err:
        print(f"optsurvey {argv[0]}: error: {err}", file=sys.stderr)
        return 2


def _import_class(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _is_mlflow_logger(entry: Any) -> bool:
    from lightning.pytorch.loggers import MLFlowLogger

    class_path = getattr(entry, "class_path", None)
    if not isinstance(class_path, str):
        return False
    try:
        cls = _import_class(class_path)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, MLFlowLogger)


def _init_args(entry: Any) -> dict[str, Any]:
    init_args = getattr(entry, "init_args", None)
    if init_args is None:
        return {}
    return init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args)


def _lightning_cli(argv: list[str], own: argparse.Namespace) -> int:
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
    from lightning.pytorch.loggers import MLFlowLogger

    from lightning_optsurvey.callbacks import DivergenceMonitor, OptimizerLoopAdapter, ResumeRNG
    from lightning_optsurvey.cli.sync import start_delivery
    from lightning_optsurvey.tracking import EXPERIMENT_KIND_TAG, deliver_pending, is_server

    class MLflowSaveConfigCallback(SaveConfigCallback):
        """Save the resolved config as an MLflow artifact when logging to MLflow, else to ``log_dir``."""

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            mlflow_loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
            if not mlflow_loggers:
                super().setup(trainer, pl_module, stage)
                return
            if self.already_saved:
                return
            if trainer.is_global_zero:
                text = self.parser.dump(self.config, skip_none=False)
                for lg in mlflow_loggers:
                    key, value = EXPERIMENT_KIND_TAG
                    lg.experiment.set_experiment_tag(lg.experiment_id, key, value)
                    lg.experiment.log_text(lg.run_id, text, self.config_filename)
            self.already_saved = True
            self.already_saved = trainer.strategy.broadcast(self.already_saved)

    class CLI(LightningCLI):
        """Any LightningModule / LightningDataModule by ``class_path``; ours when none is named.

        It checks the tracking server before anything is built, builds the MLflow loggers last (on the
        outbox for a server), and marks where configuration ends and work begins (errors before that are
        one line).
        """

        configured = False
        deliveries: list[tuple[Any, Any]] = []  # (Delivery, logger) of loggers moved to the outbox

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.set_defaults({"model": {"class_path": "lightning_optsurvey.tasks.ClassifierModule"},
                                 "data": {"class_path": "lightning_optsurvey.tasks.DigitsDataModule"}})

        def before_instantiate_classes(self) -> None:
            config = self.config.get(self.subcommand) if self.subcommand else self.config
            uris = _config_tracking_uris(config)
            for uri in uris:
                check_tracking_uri(uri)
            if any(is_server(uri) for uri in uris):
                check_outbox(own.outbox)
            # MLFlowLogger creates its store when built: build it after everything else was accepted.
            trainer = config.get("trainer")
            entries = trainer.get("logger") if trainer is not None else None
            listed = entries if isinstance(entries, list) else [entries]
            self.mlflow_entries = [e for e in listed if _is_mlflow_logger(e)]
            if self.mlflow_entries:
                self.logger_config = (trainer, entries)
                others = [e for e in listed if not _is_mlflow_logger(e)]
                trainer["logger"] = others if isinstance(entries, list) and others else False

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            trainer = super().instantiate_trainer(**kwargs)
            if getattr(self, "mlflow_entries", None):
                trainer.loggers = [*trainer.loggers, *(self._mlflow_logger(e, trainer) for e in self.mlflow_entries)]
                section, entries = self.logger_config
                section["logger"] = entries  # the saved config shows the user's logger as written
            defaults = [OptimizerLoopAdapter(), DivergenceMonitor(), ResumeRNG()]
            for callback in defaults:  # added unless the config has one
                if not any(isinstance(cb, type(callback)) for cb in trainer.callbacks):
                    trainer.callbacks.append(callback)
            return trainer

        def _mlflow_logger(self, entry: Any, trainer: Any) -> Any:
            init = _init_args(entry)
            uri = str(init.get("tracking_uri") or "")
            if uri and is_server(uri):
                init["tracking_uri"] = own.outbox
                if trainer.is_global_zero:
                    delivery = start_delivery(uri, own.outbox, str(init.get("experiment_name", "lightning_logs")))
                    logger = _import_class(entry.class_path)(**init)
                    CLI.deliveries.append((delivery, logger))
                    return logger
            return _import_class(entry.class_path)(**init)

        def _run_subcommand(self, subcommand: str) -> None:
            CLI.configured = True
            started = time.perf_counter()
            try:
                super()._run_subcommand(subcommand)
                if subcommand == "fit" and self.trainer.is_global_zero:
                    seconds = time.perf_counter() - started
                    for lg in self.trainer.loggers:
                        if isinstance(lg, MLFlowLogger):
                            lg.log_metrics({"time/train_seconds": seconds}, step=self.trainer.global_step)
            finally:
                for delivery, logger in CLI.deliveries:
                    delivery.submit(logger.run_id)
                    deliver_pending(delivery, own.sync_wait, own.outbox, delivery.experiment)

    try:
        CLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"exit_on_error": False, "prog": "optsurvey"},  # errors come back to us, in one line
            save_config_callback=MLflowSaveConfigCallback,
            trainer_defaults={
                # MLFlowLogger has no local save_dir for sqlite/http URIs; keep checkpoints out of the cwd's top.
                "default_root_dir": "lightning_logs",
                "logger": {
                    "class_path": "lightning.pytorch.loggers.MLFlowLogger",
                    "init_args": {"experiment_name": "optsurvey", "tracking_uri": DEFAULT_TRACKING_URI},
                },
            },
            args=None if argv == sys.argv[1:] else argv,  # Lightning warns when given both
        )
    except SystemExit:
        raise
    except Exception as err:
        if CLI.configured:
            raise  # an error while working: keep its traceback
        raise CLIError(_config_error_line(err, argv)) from None
    return 0


def _config_tracking_uris(config: Any) -> list[str]:
    """The ``tracking_uri`` of every MLflow logger in a parsed ``fit`` config."""
    loggers = getattr(getattr(config, "trainer", None), "logger", None)
    found = []
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        class_path = str(getattr(logger, "class_path", "") or "")
        init_args = getattr(logger, "init_args", None)
        uri = getattr(init_args, "tracking_uri", None) if init_args is not None else None
        if class_path.endswith("MLFlowLogger") and uri:
            found.append(str(uri))
    return found


_CLI_DIR = os.path.dirname(os.path.abspath(__file__))
_CLI_KEYS = {"ClassifierModule": "model", "DigitsDataModule": "data", "Trainer": "trainer"}


def _config_error_line(err: BaseException, argv: list[str]) -> str:
    """One line for a configuration error: the config key, then the reason (not jsonargparse's stack)."""
    import re

    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    if isinstance(err, CLIError):
        return str(err)
    # The innermost error raised by our (or the user's) code, not by the parser: the real reason.
    for exc in reversed(chain):
        frames = traceback.extract_tb(exc.__traceback__)
        if frames and "jsonargparse" not in frames[-1].filename and _CLI_DIR not in frames[-1].filename:
            owner = _raising_class(exc)
            key = _config_key_of(owner, argv) if owner else None
            where = f"{key} ({owner})" if key and key != _CLI_KEYS.get(owner or "") else (key or owner or "config")
            return f"{where}: {' '.join(str(exc).split())}"
    # Nested parsers (subclass mode: model -> its init args) each name their part of the key.
    keys: list[str] = []
    message = str(err)
    for exc in chain:
        if (match := re.match(r'Parser key "([^"]+)"', str(exc))) is not None:
            if not keys or keys[-1] != match.group(1):
                keys.append(match.group(1))
            message = str(exc)
    key = ".".join(keys) or None
    bullets = [b.strip()[2:] for b in message.splitlines() if re.match(r"\s+- ", b)]
    given = re.search(r"Given value: (.*)", message)
    given_type = re.search(r"Given value type: <class '([\w.]+)'>", message)
    expected = [re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", b[len("Expected a "):]).replace("NoneType", "None")
                for b in bullets if b.startswith("Expected a ")]
    reasons = [b for b in bullets if not b.endswith(":") and not b.startswith((
        "Expected a ", "Not a valid subclass", "a class path", "a dict with", "a dict without"))]
    if key is None:  # a class given by class_path: name it by where it is configured
        named = re.search(r"class_path='(?:[\w]+\.)*(\w+)'", message)
        key = _config_key_of(named.group(1), argv) if named else None
    if reasons:
        return f"{key or 'config'}: {'; '.join(reasons)}"
    innermost = str(chain[-1]).strip()
    if innermost and "\n" not in innermost and not innermost.startswith("Expected a "):
        return f"{key or 'config'}: {innermost}"
    if key and expected:
        got = f", got {given_type.group(1) if given_type else 'value'} {given.group(1)!r}" if given else ""
        return f"{key}: expected {' or '.join(expected)}{got}"
    return " ".join(message.split())[:400]


def _raising_class(exc: BaseException) -> str | None:
    """The class whose ``__init__`` raised ``exc`` (innermost), if any."""
    tb = exc.__traceback__
    owner = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            owner = type(frame.f_locals["self"]).__name__
        tb = tb.tb_next
    return owner


def _config_key_of(class_name: str, argv: list[str]) -> str | None:
    """Where ``class_name`` is configured: ``model``/``data``/``trainer``, or a path like ``trainer.callbacks[0]``."""
    if class_name in _CLI_KEYS:
        return _CLI_KEYS[class_name]
    import yaml

    def walk(node: Any, path: str) -> str | None:
        if isinstance(node, dict):
            class_path = str(node.get("class_path", ""))
            if class_path == class_name or class_path.endswith("." + class_name):
                return path
            for key, value in node.items():
                if (found := walk(value, f"{path}.{key}" if path else str(key))) is not None:
                    return found
        elif isinstance(node, list):
            for i, value in enumerate(node):
                if (found := walk(value, f"{path}[{i}]")) is not None:
                    return found
        return None

    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            try:
                with open(argv[i + 1]) as handle:
                    if (found := walk(yaml.safe_load(handle), "")) is not None:
                        return found
            except (OSError, yaml.YAMLError):
                continue
    return None


