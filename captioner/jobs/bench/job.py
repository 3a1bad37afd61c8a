"""`captioner bench`: the job (which preset, which device, where the JSON goes), its results and its table."""
from __future__ import annotations

import dataclasses
import logging
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision

from captioner import __version__
from captioner.config import ComputeConfig, require_min
from captioner.engine.runtime.compute import cpu_capability, setup_compute
from captioner.engine.runtime.device import resolve_device
from captioner.errors import CaptionerError
from captioner.files import check_writable, write_json
from captioner.jobs.bench.measure import measure_all
from captioner.jobs.bench.sizes import KEYS, PRESETS, BenchSizes, apply_overrides
from captioner.data.synthetic import write_jpegs

log = logging.getLogger("captioner")


@dataclass
class BenchJob:
    """`captioner bench`'s options."""
    device: str | None = "auto"
    preset: str = "default"  # default | smoke | full
    json_path: str | None = None  # also write the results here
    sizes: BenchSizes | None = None  # None: the preset's
    compile: bool | None = None  # None: the preset's (full compiles)
    threads: int | None = None  # CPU threads for torch; None: torch's choice
    overrides: list[str] = field(default_factory=list)  # BenchSizes field=value
    runtimes: bool = False  # only the runtime comparison: torch_fp32, ort_fp32, ort_int8 (runtimes.py)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise CaptionerError(f"unknown bench preset '{self.preset}'; use one of {', '.join(PRESETS)}")
        require_min(("--threads", self.threads, 1))
        self.sizes = apply_overrides(dataclasses.replace(self.sizes or PRESETS[self.preset]), list(self.overrides))
        if self.compile is not None:
            self.sizes.compile = self.compile


def _device_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {threads} threads"


def main(job: BenchJob) -> dict:
    """Run the benchmark at job.sizes; returns the results dict (also written to job.json_path when given)."""
    device, preset, sizes, threads = resolve_device(job.device), job.preset, job.sizes, job.threads
    if job.json_path:
        check_writable(job.json_path, "results file")  # before a benchmark of minutes
    if preset == "full" and device.type != "cuda":
        log.warning("bench --full is sized for a GPU: on %s it will take a long time", device)
    on_cuda = device.type == "cuda"
    # --runtimes: torch_fp32 is the float32 baseline whatever auto would pick (bf16 on CPUs with native bf16)
    switches = ("false", "false", False, False) if job.runtimes else (sizes.bf16, sizes.channels_last, sizes.compile,
                                                                     sizes.gpu_decode)
    compute = setup_compute(ComputeConfig(*switches), device)
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or previous_threads)
        with tempfile.TemporaryDirectory(prefix="captioner-bench-") as workdir:
            numbers = _runtimes(sizes, compute, Path(workdir)) if job.runtimes else measure_all(sizes, compute,
                                                                                                Path(workdir))
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    results = {
        "device": _device_name(device, threads),
        "versions": {"captioner": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
                     "python": platform.python_version(), "cuda": torch.version.cuda if on_cuda else None,
                     "cudnn": torch.backends.cudnn.version() if on_cuda else None},
        "settings": {"preset": preset, "device_type": device.type, "threads": threads,
                     **dataclasses.asdict(sizes),
                     # what actually ran, after resolving auto for this device
                     "bf16_active": compute.bf16, "compile_active": compute.compile,
                     "channels_last_active": compute.channels_last, "gpu_decode_active": compute.gpu_decode,
                     "compute": compute.describe()},
        **({"cpu_capability": dataclasses.asdict(cpu_capability()) | {"native_bf16": cpu_capability().native_bf16}}
           if not on_cuda else {}),
        **(numbers if job.runtimes else _rounded(numbers)),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if job.json_path:
        write_json(job.json_path, results, "bench results", indent=1)
    return results


def _rounded(numbers: dict) -> dict:
    return {**{k: round(v, 4 if k.endswith("fraction") else 2) for k, v in numbers.items()},
            "beam_batched_speedup": round(numbers["beam_batched_images_per_s"] / numbers["beam_per_image_images_per_s"],
                                          2),
            "train_cached_speedup": round(numbers["train_captions_per_s_cached"] /
                                          numbers["train_captions_per_s_images"], 2)}


def _runtimes(sizes: BenchSizes, compute, workdir: Path) -> dict:
    """{"runtimes": measure_runtimes(...)} on the bench's synthetic JPEGs."""
    from captioner.engine.infer.onnx_export import require_onnx
    require_onnx("bench --runtimes")  # before anything is built: the missing extra in one line
    from captioner.jobs.bench.runtimes import measure_runtimes
    paths = write_jpegs(workdir / "jpegs", max(sizes.runtime_images, sizes.calibration_images), sizes.jpeg_width,
                        sizes.jpeg_height)
    return {"runtimes": measure_runtimes(sizes, compute, workdir, paths)}


def format_table(results: dict) -> str:
    s = results["settings"]
    layer = s["layer"] or "last stage"  # "" hooks each arch's last feature stage, as encoder.layer does
    if "runtimes" in results:
        from captioner.jobs.bench.runtimes import format_runtimes
        return "\n".join([f"captioner bench --runtimes on {results['device']} ({s['preset']}: {s['runtime_archs']} "
                          f"{layer} at {s['image_size']}, {s['jpeg_width']}x{s['jpeg_height']} JPEGs, decoder "
                          f"{s['decoder_dim']}, vocabulary {s['vocab_size']}; torch_fp32 in {s['compute']})",
                          *_cpu_lines(results), *format_runtimes(results["runtimes"], s),
                          f"  ({results['seconds']} s in all)"])
    lines = [f"captioner bench on {results['device']} ({s['preset']}: {s['arch']} {layer} at {s['image_size']}, "
             f"{s['jpeg_width']}x{s['jpeg_height']} JPEGs, decoder {s['decoder_dim']}, vocabulary {s['vocab_size']}, "
             f"bf16 {'on' if s['bf16_active'] else 'off'}, channels_last "
             f"{'on' if s['channels_last_active'] else 'off'}, compile {'on' if s['compile_active'] else 'off'})"]
    lines += _cpu_lines(results)
    units = {"images": "images/s", "captions": "captions/s"}
    for key in (*KEYS, "beam_batched_speedup", "train_cached_speedup"):
        unit = "x" if key.endswith("speedup") else units["captions" if "captions" in key else "images"]
        lines.append(f"  {key:<32} {results[key]:>12,.2f} {unit}")
    lines.append(f"  {'scst_reward_fraction':<32} {results['scst_reward_fraction']:>12.4f} of the SCST step time")
    lines.append(f"  ({results['seconds']} s in all)")
    return "\n".join(lines)


def _cpu_lines(results: dict) -> list[str]:
    if "cpu_capability" not in results:
        return []
    cap = results["cpu_capability"]
    return [f"  CPU: {cap['isa']} kernels, AVX512-BF16 {'yes' if cap['avx512_bf16'] else 'no'}, "
            f"AMX {'yes' if cap['amx'] else 'no'}"]
