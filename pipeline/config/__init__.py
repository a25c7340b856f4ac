"""The configuration: its typed sections (``sections``), how a YAML file and dotted overrides become one
(``loading``), and the reference page written from the sections' docstrings (``reference``).

Owns: every key, its default and its check. May import only the base pieces (``pipeline.errors``,
``pipeline.formula``, ``pipeline.artifacts``); everything else imports it. ``from pipeline.config import Config,
load_config`` is the front door.
"""

from pipeline.config.loading import ConfigError, dump, load_config, mask_password, parse_overrides
from pipeline.config.sections import (
                                      DEVICE_PATTERN,
                                      EMBED_MEMBER,
                                      FEATURES_MEMBER,
                                      Config,
                                      Data,
                                      Embed,
                                      Ensemble,
                                      Features,
                                      Folds,
                                      Infer,
                                      Paths,
                                      Runtime,
                                      Section,
                                      Submit,
                                      Train,
                                      Tune,
                                      TuneParam,
)

__all__ = ["DEVICE_PATTERN", "EMBED_MEMBER", "FEATURES_MEMBER", "Config", "ConfigError", "Data", "Embed", "Ensemble",
           "Features", "Folds", "Infer", "Paths", "Runtime", "Section", "Submit", "Train", "Tune", "TuneParam", "dump",
           "load_config", "mask_password", "parse_overrides"]
