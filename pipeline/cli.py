"""The one command line every stage shares: ``--config FILE`` plus dotted overrides, and the run's log.

Every stage run tees what it prints (stdout and stderr, its error message or traceback included) into a log file,
``paths.logs``/<stage>[-<backbone>]-<UTC YYYYmmdd-HHMMSS>.log under the work directory, while the terminal still
sees it all; a progress bar's redraws (text with a carriage return) stay on the terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path

from pipeline import layout
from pipeline.config import Config, load_config
from pipeline.config.loading import mask_password
from pipeline.errors import ConfigError, PipelineError

# A stage's own config section, where it is not the section named after the stage.
SECTIONS = {"prepare": "data", "eda": "data"}


class Tee:
    """A text stream that writes to ``stream`` and to ``log``: text with a carriage return (a progress bar redrawn
    in place) goes to ``stream`` only, and a failing log write (a full disk) never stops the stage."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        if "\r" not in text:
            with contextlib.suppress(OSError, ValueError):
                self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        with contextlib.suppress(OSError, ValueError):
            self.log.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding: the terminal's, so tqdm draws bars only on a terminal
        return getattr(self.stream, name)


@contextlib.contextmanager
def run_log(path: Path):
    """Tee sys.stdout and sys.stderr into ``path`` for the block; an exception escaping it is logged with its
    traceback. A log that cannot be created (a read-only folder) is skipped with a note, never an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log = open(path, "a", buffering=1, encoding="utf-8")  # append: forked workers write to it too
    except OSError as error:
        print(f"note: no run log ({path}: {error.strerror})", file=sys.stderr)
        yield None
        return
    with contextlib.suppress(OSError):
        log.write(f"# {mask_password(' '.join(sys.argv))}\n")  # a database URL's password stays out
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Tee(stdout, log), Tee(stderr, log)
    try:
        yield path
    except Exception:  # SystemExit and KeyboardInterrupt: run() printed their message already
        with contextlib.suppress(OSError):
            log.write(traceback.format_exc())
        raise
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        log.close()


def stage_name(main) -> str:
    """The stage a ``main`` belongs to: ``train`` for pipeline.train, also when it runs as ``__main__``."""
    spec = getattr(sys.modules.get(main.__module__), "__spec__", None)
    return (spec.name if spec is not None else main.__module__).rpartition(".")[2]


def stage_help(stage: str) -> str:
    """What a stage reads and writes (pipeline.layout's paths under the default config) and its config section."""
    if stage not in layout.STAGES:
        return ""
    per_backbone = stage in layout.PER_BACKBONE
    cfg, backbone = Config(), ("BACKBONE" if per_backbone else None)

    def names(paths) -> str:
        return ", ".join(str(path).replace("BACKBONE", "<backbone>") for path in paths)

    reads = names(layout.stage_inputs(cfg, stage, backbone)) or "the competition folder (data.source, data.dir)"
    return (f"stage {stage} (paths as the default config sets them; the `paths` section moves them)\n"
            f"  reads:  {reads}\n  writes: {names(layout.stage_outputs(cfg, stage, backbone))}\n"
            f"  log:    {layout.logs_dir(cfg)}/{stage}-{'<backbone>-' if per_backbone else ''}<UTC time>.log\n"
            f"  config: the `{SECTIONS.get(stage, stage)}` section (every key: docs/configuration.md)")


def fail(error: PipelineError):
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2) from None


def run(main, description: str, argv: list[str] | None = None, backbone_option: bool = False):
    """Parse ``--config FILE [--backbone NAME] key.sub=value ...`` and call ``main(cfg)``, logging the run.

    A ``PipelineError`` (bad input, bad config) is printed as one message and exits 2,
    without a traceback: the message names what to fix.
    """
    stage = stage_name(main)
    parser = argparse.ArgumentParser(prog=f"python -m pipeline {stage}" if stage in layout.STAGES else None,
                                     description=description, epilog=stage_help(stage),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.environ.get("PIPELINE_CONFIG", "params.yaml"),
                        help="YAML config (default: params.yaml)")
    if backbone_option:
        parser.add_argument("--backbone", default=None, help="only this backbone (default: all of `backbones`)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3")
    args = parser.parse_args(argv)
    backbone = args.backbone if backbone_option else None
    try:  # before the log: until the config is read there is no folder to log to
        config: Config = load_config(args.config, args.overrides)
        if backbone is not None and backbone not in config.backbones:
            raise ConfigError(f"--backbone {backbone} is not in backbones {list(config.backbones)}")
    except PipelineError as error:
        fail(error)
    with run_log(layout.log_file(config, stage, backbone, datetime.now(timezone.utc))):
        try:
            return main(config, backbone=backbone) if backbone_option else main(config)
        except PipelineError as error:
            fail(error)
        except KeyboardInterrupt:
            print("interrupted: outputs written so far are complete; re-run to continue", file=sys.stderr)
            raise SystemExit(130) from None
