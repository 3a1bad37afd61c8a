"""The compute switch: auto resolves from the CPU's bf16 units; bf16 training keeps float32 weights, optimizer
state, loss and checkpoints; bf16 and float32 captions of one checkpoint agree."""
import logging

import pytest
import torch

from captioner.config import ComputeConfig, load_config
from captioner.engine.runtime import compute as compute_module
from captioner.engine.infer.checkpoint import load_checkpoint
from captioner.engine.runtime.compute import CpuCapability, autocast, setup_compute
from captioner.errors import CaptionerError
from captioner.engine.train.step import CaptionLoss
from captioner.jobs import evaluate, train

from helpers import TINY, small_config

NATIVE = CpuCapability("AVX512", avx512_bf16=True, amx=False)
EMULATED = CpuCapability("AVX2", avx512_bf16=False, amx=False)
CPU = torch.device("cpu")


@pytest.mark.parametrize("capability, expected", [(NATIVE, True), (EMULATED, False)])
def test_auto_follows_the_cpus_bf16_units(monkeypatch, caplog, capability, expected):
    monkeypatch.setattr(compute_module, "cpu_capability", lambda: capability)
    monkeypatch.setattr(compute_module, "_announced", set())
    with caplog.at_level(logging.INFO, logger="captioner"):
        compute = setup_compute(ComputeConfig(), CPU)
        setup_compute(ComputeConfig(), CPU)
    assert compute.bf16 is expected and compute.channels_last is expected
    lines = [r.message for r in caplog.records if r.message.startswith("compute:")]
    assert len(lines) == 1  # said once, with what and why
    assert ("bf16 autocast" if expected else "float32") in lines[0] and capability.isa in lines[0]
    assert ("native bf16: AVX512-BF16" if expected else "no native bf16") in lines[0]
    # explicit values win over auto, either way; CUDA's auto is on whatever the CPU has
    forced = setup_compute(ComputeConfig(bf16="true" if not expected else "false", channels_last="false"), CPU)
    assert forced.bf16 is not expected and forced.channels_last is False and "compute.bf16=" in forced.why
    cuda = setup_compute(ComputeConfig(), torch.device("cuda"))
    assert cuda.bf16 and cuda.channels_last


def test_capability_falls_back_to_cpuinfo(monkeypatch):
    monkeypatch.setattr(compute_module, "_torch_check", lambda name: None)
    monkeypatch.setattr(compute_module, "_cpuinfo_flags", lambda: {"avx2", "avx512_bf16"})
    compute_module.cpu_capability.cache_clear()
    try:
        cap = compute_module.cpu_capability()
        assert cap.avx512_bf16 and not cap.amx and cap.native_bf16
    finally:
        compute_module.cpu_capability.cache_clear()


def test_switches_accept_auto_and_booleans(tmp_path):
    cfg = load_config(TINY, ["compute.bf16=false", "compute.channels_last=yes"])
    assert cfg.compute.bf16 == "false" and cfg.compute.channels_last == "true"
    assert load_config(TINY).compute.bf16 == "auto"
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("compute:\n  bf16: true\n  channels_last: auto\n")
    assert load_config(yaml_file).compute.bf16 == "true"
    with pytest.raises(CaptionerError, match="compute.bf16' must be one of auto, true, false"):
        load_config(TINY, ["compute.bf16=fast"])
    with pytest.raises(TypeError, match="resolved bool"):
        autocast(CPU, "false")  # a truthy string must never switch bf16 on


@pytest.mark.slow
def test_bf16_training_keeps_float32_weights_state_and_loss(small_root, tmp_path):
    """A bf16 run on any CPU: the loss is float32, and weights, gradients, Adam moments and checkpoints too."""
    cfg = small_config(small_root, "compute.bf16=true", "compute.channels_last=true", "train.epochs=1")
    compute = setup_compute(cfg.compute, CPU)
    summary = train.main(train.TrainJob(cfg, tmp_path / "run", "cpu"))
    state = load_checkpoint(summary["last_checkpoint"])
    assert state["config"]["compute"]["bf16"] == "true"
    assert all(t.dtype == torch.float32 for t in state["model"].values() if t.is_floating_point())
    moments = [v for s in state["optimizer"]["state"].values() for k, v in s.items() if k.startswith("exp_avg")]
    assert moments and all(m.dtype == torch.float32 for m in moments)

    # one step by hand: the activations are bf16, the loss and every gradient float32
    from captioner.engine.infer.checkpoint import model_from_checkpoint
    model = model_from_checkpoint(state)[0].train()
    compute.prepare_encoder(model.encoder)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    captions = torch.randint(4, 20, (4, 6))
    captions[:, 0] = 1
    with compute.autocast():
        raw = model.encode(images)
        loss, ce, _ = CaptionLoss(model)(images, captions, torch.tensor([6, 5, 4, 3]))
    loss.backward()
    assert raw.dtype == torch.bfloat16 and loss.dtype == ce.dtype == torch.float32
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.trainable_parameters())


@pytest.mark.slow
def test_bf16_and_float32_captions_agree(trained, tmp_path):
    """One trained checkpoint evaluated greedily in float32 and in bf16: >= 90% identical captions, and a
    checkpoint trained under bf16 (auto on this CPU, or not) loads and evaluates in float32."""
    summary, _ = trained
    runs = {}
    for name in ("fp32", "bf16"):
        switch = "false" if name == "fp32" else "true"
        runs[name] = evaluate.main(evaluate.EvaluateJob(summary["best_checkpoint"], "test", beam_size=1, out_dir=str(tmp_path / name),
                                   device="cpu", compute=ComputeConfig(bf16=switch, channels_last=switch)))
    import json
    captions = {name: {r["image_id"]: r["caption"] for r in json.loads(open(m["results_file"]).read())}
                for name, m in runs.items()}
    assert captions["fp32"].keys() == captions["bf16"].keys() and len(captions["fp32"]) >= 50
    same = sum(captions["fp32"][i] == captions["bf16"][i] for i in captions["fp32"]) / len(captions["fp32"])
    print(f"greedy agreement {same:.3f}, BLEU-4 fp32 {runs['fp32']['bleu4']:.4f} bf16 {runs['bf16']['bleu4']:.4f}")
    assert same >= 0.9, same
    assert runs["fp32"]["bleu4"] > 0.5 and abs(runs["bf16"]["bleu4"] - runs["fp32"]["bleu4"]) <= 0.02
