"""The decoder recipes selectable in ModelConfig, and old checkpoints' configs keeping their behaviour."""
import dataclasses

import pytest
import torch

from captioner.config import Config, LEGACY_DEFAULTS, ModelConfig, from_saved_dict, to_dict
from captioner.engine.infer.checkpoint import model_from_checkpoint
from captioner.model.decoding import SearchOptions, beam_search
from captioner.model.caption_model import CaptionModel

from helpers import GridStub


@pytest.mark.parametrize("features,dim", [("project", 16), ("norm", 24), ("raw", 24)])
def test_feature_paths_attention_and_state_variants(features, dim):
    torch.manual_seed(0)
    cfg = ModelConfig(16, 16, 20, dropout=0.0, features=features, attention="relu", init_state="linear",
                      gate=features != "raw")
    model = CaptionModel(None, cfg, 30, encoder=GridStub()).eval()
    raw = torch.rand(2, 24, 3, 3)
    assert model.project(raw).shape == (2, 9, dim)  # the decoder attends over all 9 regions of width dim
    assert model.decoder.lstm.input_size == 16 + dim
    assert (model.decoder.gate is None) == (features == "raw")
    captions = torch.randint(4, 30, (2, 6))
    logits, alphas = model(raw, captions)
    assert logits.shape == (2, 5, 30) and torch.allclose(alphas.sum(-1), torch.ones(2, 5), atol=1e-5)
    out = beam_search(model, raw, SearchOptions(beam_size=2, max_len=5))
    assert out.tokens.shape[0] == 2 and out.alphas.shape[-1] == 9


def test_a_checkpoint_without_the_new_keys_keeps_the_old_behaviour():
    saved = to_dict(Config())
    for key in LEGACY_DEFAULTS["model"]:
        del saved["model"][key]  # as written before these keys existed
    cfg = from_saved_dict(saved)
    assert {k: getattr(cfg.model, k) for k in LEGACY_DEFAULTS["model"]} == LEGACY_DEFAULTS["model"]
    # and a saved value wins over the legacy one
    saved["model"]["attention"] = "relu"
    assert from_saved_dict(saved).model.attention == "relu"


def test_old_checkpoint_loads_with_its_projector(tmp_path):
    torch.manual_seed(0)
    cfg = Config()
    cfg.encoder = dataclasses.replace(cfg.encoder, arch="resnet18", image_size=32)
    cfg.model = ModelConfig(16, 16, 16, **LEGACY_DEFAULTS["model"])
    model = CaptionModel(cfg.encoder, cfg.model, 10)
    saved = to_dict(cfg)
    for key in LEGACY_DEFAULTS["model"]:
        del saved["model"][key]
    vocab = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(6)]
    loaded, _, loaded_cfg = model_from_checkpoint({"model": model.state_dict(), "config": saved, "vocab": vocab})
    assert loaded_cfg.model.features == "project" and isinstance(loaded.projector, torch.nn.Sequential)


def test_attention_weights_sum_to_one_in_float32_under_bf16_autocast():
    # bf16 autocast (CUDA, CPUs with native bf16) would round the softmax to ~1e-3; the maps and the context
    # vector read float32 weights. CPU autocast runs on any CPU (emulated where the units are missing).
    torch.manual_seed(0)
    model = CaptionModel(None, ModelConfig(16, 16, 20, dropout=0.0), 30, encoder=GridStub()).eval()
    raw, captions = torch.rand(2, 24, 3, 3), torch.randint(4, 30, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        logits, alphas = model(raw, captions)
        out = beam_search(model, raw, SearchOptions(beam_size=2, max_len=5))
    assert logits.dtype == torch.bfloat16  # the autocast really ran
    assert alphas.dtype == torch.float32 and torch.allclose(alphas.sum(-1), torch.ones(2, 5), atol=1e-6)
    assert out.alphas.dtype == torch.float32
