"""The training-side variety levers: label smoothing in the cross-entropy, SCST's diversity term."""
import pytest
import torch
import torch.nn.functional as F

from captioner.engine.scst import similarity_to_other_images
from captioner.model.decoder import caption_loss


def test_label_smoothing_moves_the_target_towards_uniform():
    torch.manual_seed(0)
    logits, alphas = torch.randn(2, 3, 7), torch.full((2, 3, 4), 0.25)
    captions = torch.tensor([[1, 4, 5, 2], [1, 6, 2, 0]])
    lengths = torch.tensor([4, 3])
    plain, ce = caption_loss(logits, alphas, captions, lengths, alpha_c=0.0)
    smooth, smooth_ce = caption_loss(logits, alphas, captions, lengths, alpha_c=0.0, label_smoothing=0.2)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    logp = F.log_softmax(logits[mask], dim=-1)
    targets = captions[:, 1:][mask]
    expected = (0.8 * -logp.gather(1, targets[:, None]).squeeze(1) + 0.2 * -logp.mean(dim=1)).mean()
    assert torch.allclose(smooth, expected) and torch.allclose(plain, ce) and not torch.allclose(plain, smooth)


def test_similarity_to_other_images_finds_generic_captions():
    end, pad = 2, 0
    tokens = torch.tensor([[5, 6, 7, end, pad],   # image 0: "a dog runs"
                           [5, 6, 7, end, pad],   # image 1: the same caption
                           [8, 9, 10, 11, end],   # image 2: its own words
                           [8, 9, 10, 11, end],   # image 2 again: the same image does not count
                           [5, 6, 7, end, 9]])    # image 3: after <end> nothing counts
    images = torch.tensor([0, 1, 2, 2, 3])
    similarity = similarity_to_other_images(tokens, images)
    assert similarity[[0, 1, 4]].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert similarity[[2, 3]].tolist() == pytest.approx([0.0, 0.0])
    partly = similarity_to_other_images(torch.tensor([[5, 6, 7, 8, end], [5, 6, 9, 10, end]]), torch.tensor([0, 1]))
    # 4 words + 3 word pairs each, sharing 2 words and 1 pair: cosine 3/7
    assert partly.tolist() == pytest.approx([3 / 7, 3 / 7], abs=1e-6)
    assert similarity_to_other_images(tokens[:2], torch.tensor([0, 0])).tolist() == [0.0, 0.0]
