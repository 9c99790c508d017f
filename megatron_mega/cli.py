"""`megatron-mega`: the one console entry point. Subcommands stay thin and call into the package."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from megatron_mega.model.config import ConfigError, MegaConfig
from megatron_mega.yaml_config import ConfigFileError, apply_overrides, load_yaml


# the shipped tiny model config: beside the package in a checkout (an editable install), else in the current
# directory's configs/ (configs/ is not package data)
_BESIDE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "model", "tiny.yaml")
DEFAULT_MODEL_CONFIG = _BESIDE if os.path.exists(_BESIDE) else os.path.join("configs", "model", "tiny.yaml")


def _model_config(path: str, overrides: Sequence[str]) -> MegaConfig:
    outside = [o for o in overrides if not o.split("=", 1)[0].strip().startswith("model.")]
    if outside:
        raise ConfigFileError(f"override {outside[0]!r}: these commands read the model section only "
                              f"(model.FIELD=value)")
    data = apply_overrides(load_yaml(path), overrides)
    section = data.get("model", {})
    if not isinstance(section, dict):
        raise ConfigFileError(f"{path}: 'model' must be a mapping of MegaConfig fields")
    unknown = sorted(set(section) - set(MegaConfig.field_names()) - {"num_labels"})
    if unknown:
        raise ConfigFileError(f"{path}: model: unknown MegaConfig field(s) {unknown}")
    try:
        return MegaConfig(**section)
    except (ConfigError, TypeError) as err:
        raise ConfigFileError(f"{path}: model.{err}") from None


def _cmd_demo(args: argparse.Namespace) -> int:
    from megatron_mega.demo import run_demo

    run_demo(_model_config(args.config, args.overrides), args.output_dir, seed=args.seed)
    return 0


def _cmd_model_info(args: argparse.Namespace) -> int:
    from megatron_mega.model import MegaModel

    config = _model_config(args.config, args.overrides)
    model = MegaModel(config, add_pooling_layer=False)
    print(config.to_json_string(), end="")
    print(f"parameters: {model.num_parameters():,} "
          f"({model.num_parameters(exclude_embeddings=True):,} without embeddings)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-mega", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="build a model from a config, save it, load it into all six heads")
    demo.add_argument("--config", default=DEFAULT_MODEL_CONFIG,
                      help="YAML file with a 'model' section (default: the shipped configs/model/tiny.yaml)")
    demo.add_argument("--output-dir", default="runs/demo", help="where the Hugging Face-format checkpoint goes")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.hidden_size=128")
    demo.set_defaults(func=_cmd_demo)

    info = commands.add_parser("model-info", help="validate a model config and print it with parameter counts")
    info.add_argument("--config", default=DEFAULT_MODEL_CONFIG)
    info.add_argument("overrides", nargs="*")
    info.set_defaults(func=_cmd_model_info)

    from data_prep.commands import add_prepare_command
    from megatron_mega.convert.commands import add_commands as add_convert_commands
    from megatron_mega.finetune.commands import add_commands as add_finetune_commands
    from megatron_mega.training.commands import add_commands as add_train_commands
    from launch.commands import add_commands as add_launch_commands

    add_prepare_command(commands)
    add_train_commands(commands)
    add_convert_commands(commands)
    add_finetune_commands(commands)
    add_launch_commands(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigFileError, ConfigError) as err:
        print(f"megatron-mega: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
