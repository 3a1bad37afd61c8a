"""`--print-config`: the resolved config a command would run with, as YAML, and nothing else (no work, no file
written, no server started). train and extract: their job's config (the file, then the KEY=VALUE overrides, then
the defaults); evaluate, caption and serve: the checkpoint's own, as those commands apply their overrides and
generation options; demo: the config its training runs with (configs/tiny.yaml and the demo's settings)."""
from __future__ import annotations

from pathlib import Path

from captioner.config import ComputeConfig, Config, apply_overrides, from_dict, from_saved_dict, to_yaml
from captioner.errors import CaptionerError

CHECKPOINT_COMMANDS = ("evaluate", "caption", "serve")


def print_config(command: str, job) -> int:
    """Print the job's resolved config as YAML; the exit status (0)."""
    if command in CHECKPOINT_COMMANDS:
        cfg = checkpoint_config(job)
    elif command == "demo":
        from captioner.jobs.demo import demo_config  # on use: `captioner --help` stays instant
        cfg = demo_config(job)
    else:
        cfg = job.cfg
    print(to_yaml(cfg), end="", flush=True)
    return 0


def checkpoint_config(job) -> Config:
    """The config evaluate, caption or serve decodes with: the checkpoint's (a local file or model folder, its
    weights left unread), this machine's compute section, the KEY=VALUE overrides, then --beam, --sample,
    --temperature, --batch-size and the generation options given (as Predictor.load and settings_for apply them;
    a job without one of these options, such as serve's, leaves it as the checkpoint has it)."""
    from captioner.engine.infer.checkpoint import load_checkpoint  # on use: `captioner --help` stays instant
    from captioner.engine.infer.generation import decode_keys, given_options
    from captioner.engine.infer.model_folder import is_model_folder, read_folder_config
    path = Path(job.checkpoint).expanduser()
    if not path.exists():
        raise CaptionerError(f"--print-config reads a local checkpoint file or model folder; {job.checkpoint} is "
                             f"neither (a Hub repo: download it first, or drop --print-config)")
    saved = read_folder_config(path)["config"] if is_model_folder(path) else load_checkpoint(path, mmap=True)["config"]
    try:
        cfg = from_saved_dict(saved)
    except CaptionerError as e:
        raise CaptionerError(f"checkpoint {path} has an invalid config: {e}") from None
    # the training machine's switches never apply here (serve takes compute.* as overrides only)
    cfg.compute = getattr(job, "compute", None) or ComputeConfig()
    apply_overrides(cfg, list(job.overrides))
    temperature, batch_size = getattr(job, "temperature", None), getattr(job, "batch_size", None)
    decode = {**decode_keys(given_options(job)),
              **({"beam_size": job.beam_size} if job.beam_size else {}),
              **({"sample": True} if getattr(job, "sample", False) else {}),
              **({"temperature": temperature} if temperature is not None else {}),
              **({"batch_size": batch_size} if batch_size else {})}
    if "groups" not in decode and decode.get("beam_size", cfg.decode.beam_size) % cfg.decode.groups:
        decode["groups"] = 1  # as DecodeSettings.of: a beam its groups do not divide searches without groups
    return from_dict({"decode": decode}, cfg)
