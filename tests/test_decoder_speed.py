"""The training forward (batched, fused, ended captions dropped) computes what looping the decoding step does."""
import pytest
import torch

from captioner.config import ModelConfig
from captioner.model.caption_model import CaptionModel
from captioner.model.decoder import caption_loss

from helpers import GridStub


def _loss_and_grads(model, raw, captions, lengths, stepwise: bool, seed: int = 3):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks for both
    if stepwise:
        logits, alphas = model.decoder.forward_stepwise(model.project(raw), captions)
    else:
        logits, alphas = model(raw, captions, lengths)
    loss, _ = caption_loss(logits, alphas, captions, lengths, alpha_c=1.0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), logits.detach(), alphas.detach(), grads


@pytest.mark.parametrize("features,gate,attention,dropout", [
    ("norm", True, "tanh", 0.3), ("norm", False, "relu", 0.0), ("project", True, "tanh", 0.5),
    ("raw", True, "tanh", 0.0), ("raw", False, "tanh", 0.2)])
def test_training_forward_equals_looping_the_decoding_step(features, gate, attention, dropout):
    torch.manual_seed(0)
    cfg = ModelConfig(16, 12, 20, dropout=dropout, features=features, attention=attention, gate=gate)
    model = CaptionModel(None, cfg, 30, encoder=GridStub()).train()
    raw = torch.randn(5, 24, 3, 3) * 3 + 1
    captions = torch.randint(4, 30, (5, 8))
    lengths = torch.tensor([8, 3, 8, 5, 2])  # ragged, unsorted, ties: rows drop out of the batch as they end
    loss, logits, alphas, grads = _loss_and_grads(model, raw, captions, lengths, stepwise=False)
    ref_loss, ref_logits, ref_alphas, ref_grads = _loss_and_grads(model, raw, captions, lengths, stepwise=True)
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    mask = torch.arange(7)[None, :] < (lengths[:, None] - 1)  # (B, T): positions up to each <end>
    assert torch.allclose(logits[mask], ref_logits[mask], atol=1e-5)
    assert torch.allclose(alphas[mask], ref_alphas[mask], atol=1e-6)
    assert (logits[~mask] == 0).all() and (alphas[~mask] == 0).all()
    assert grads.keys() == ref_grads.keys() and len(grads) >= 12
    for name, grad in grads.items():
        atol = 1e-5 * ref_grads[name].abs().max() + 1e-7  # attention.score.bias: 0 up to rounding (softmax)
        assert torch.allclose(grad, ref_grads[name], atol=atol, rtol=1e-4), name


def test_training_forward_without_lengths_fills_every_position():
    torch.manual_seed(0)
    model = CaptionModel(None, ModelConfig(16, 12, 20, dropout=0.0), 30, encoder=GridStub()).eval()
    raw, captions = torch.randn(3, 24, 3, 3), torch.randint(4, 30, (3, 6))
    logits, alphas = model(raw, captions)
    ref_logits, ref_alphas = model.decoder.forward_stepwise(model.project(raw), captions)
    assert logits.shape == (3, 5, 30) and torch.allclose(logits, ref_logits, atol=1e-5)
    assert torch.allclose(alphas, ref_alphas, atol=1e-6)


def test_step_product_weight_gradient_equals_per_step_products_in_float32_and_bf16():
    """StepProduct's one deferred weight-gradient product over all steps equals autograd's per-step sum, and under
    bf16 autocast it runs in bf16 and returns a float32 gradient close to the float32 one."""
    from captioner.model.deferred_grad import StepProduct
    torch.manual_seed(0)
    weight = torch.randn(12, 9, requires_grad=True)
    h0 = torch.randn(5, 9, requires_grad=True)

    def run(deferred: bool, bf16: bool = False):
        weight.grad = h0.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            product, h, total = StepProduct(weight), h0, 0
            for t, n in enumerate([5, 5, 3, 1]):  # rows drop out as in the decoder
                y = product(h[:n], first=t == 0) if deferred else torch.nn.functional.linear(h[:n], weight)
                h = torch.tanh(y[:, :9].float()) + h[:n]
                total = total + (y.float() ** 2).sum()
        total.backward()
        return weight.grad.clone(), h0.grad.clone()

    (w_ref, h_ref), (w, h) = run(False), run(True)
    assert torch.allclose(w, w_ref, rtol=1e-5, atol=1e-5) and torch.allclose(h, h_ref, rtol=1e-5, atol=1e-5)
    w_bf16, _ = run(True, bf16=True)
    assert w_bf16.dtype == torch.float32 and torch.allclose(w_bf16, w_ref, rtol=0.05, atol=0.05 * w_ref.abs().max())
