"""The one command line every stage shares: ``--config FILE`` plus dotted overrides."""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError, PipelineError


def run(main, description: str, argv: list[str] | None = None, backbone_option: bool = False):
    """Parse ``--config FILE [--backbone NAME] key.sub=value ...`` and call ``main(cfg)``.

    A ``PipelineError`` (bad input, bad config) is printed as one message and exits 2,
    without a traceback: the message names what to fix.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=os.environ.get("PIPELINE_CONFIG", "params.yaml"),
                        help="YAML config (default: params.yaml)")
    if backbone_option:
        parser.add_argument("--backbone", default=None, help="only this backbone (default: all of `backbones`)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3")
    args = parser.parse_args(argv)
    try:
        config: Config = load_config(args.config, args.overrides)
        if backbone_option:
            if args.backbone is not None and args.backbone not in config.backbones:
                raise ConfigError(f"--backbone {args.backbone} is not in backbones {list(config.backbones)}")
            result = main(config, backbone=args.backbone)
        else:
            result = main(config)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted: outputs written so far are complete; re-run to continue", file=sys.stderr)
        raise SystemExit(130) from None
    return result
