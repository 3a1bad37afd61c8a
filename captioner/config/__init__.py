"""Typed configuration: YAML files in configs/ load into dataclasses (sections.py); `key=value` overrides any
field (load.py); values are checked when read (validate.py).

    cfg = load_config("configs/tiny.yaml", ["encoder.layer=layer3", "train.epochs=2"])

Unknown keys and values of the wrong type are CaptionerErrors that name the key and list the valid ones.
"""
from captioner.config.defaults import FOLLOWING_KEYS, inherit_old_defaults, resolve_defaults
from captioner.config.keys import valid_keys, what_is_valid
from captioner.config.load import (PREPROCESS_KEYS, apply_overrides, coerce, from_dict, from_saved_dict,
                                   inherit_preprocess, load_config, override_value, parse_yaml, shipped_config,
                                   stated_keys, to_dict, to_yaml)
from captioner.config.sections import (DATASET_FORMATS, DEFAULTS_BEFORE_MEASURED, INTERPOLATIONS, LEGACY_DEFAULTS,
                                       LOGGERS, LR_SCHEDULES, OBJECTIVES, SCST_BASELINES, SELECT_METRICS, CacheConfig,
                                       ComputeConfig, Config, DatasetConfig, DecodeConfig, EncoderConfig, ModelConfig,
                                       Switch, TrainConfig)
from captioner.config.validate import (CHECKPOINT_SECTIONS, INT_RANGE, check_checkpoint_overrides, check_fields,
                                       require_min, return_sequences_problem, validate)

__all__ = ["CHECKPOINT_SECTIONS", "DATASET_FORMATS", "DEFAULTS_BEFORE_MEASURED", "FOLLOWING_KEYS", "INTERPOLATIONS",
           "INT_RANGE", "LEGACY_DEFAULTS", "LOGGERS", "LR_SCHEDULES", "OBJECTIVES", "PREPROCESS_KEYS", "SCST_BASELINES",
           "SELECT_METRICS", "CacheConfig", "ComputeConfig", "Config", "DatasetConfig", "DecodeConfig",
           "EncoderConfig", "ModelConfig", "Switch", "TrainConfig", "apply_overrides", "check_checkpoint_overrides",
           "check_fields", "coerce", "from_dict", "from_saved_dict", "inherit_old_defaults", "inherit_preprocess",
           "load_config",
           "override_value", "parse_yaml", "require_min", "resolve_defaults", "return_sequences_problem",
           "shipped_config", "stated_keys", "to_dict", "to_yaml", "valid_keys", "validate", "what_is_valid"]
