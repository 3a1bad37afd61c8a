"""Measure how fast captioner runs on this machine, on synthetic photo-like JPEGs of realistic size.

    captioner bench --device cpu --json bench.json     # ResNet-18 at 224: about a minute on 2 CPU cores
    captioner bench --device cuda --full               # ResNet-152 at 224, 640x480 JPEGs, COCO recipe sizes
    captioner bench --smoke                            # tiny sizes: checks that everything runs (seconds)
    captioner bench --device cpu arch=resnet152 train_steps_images=1   # any BenchSizes field=value

Each number is items per second over a timed run that follows a warm-up run (cuDNN autotuning and
torch.compile happen in the warm-up):
    encoder_images_per_s           the frozen CNN alone, on uint8 batches already on the device
    extract_images_per_s           `captioner extract`: JPEG files -> decode, resize, CNN -> feature cache
                                   (after the first batch: worker start-up is left out)
    train_captions_per_s_cached    training steps fed from the feature cache
    train_captions_per_s_images    training steps running the CNN on every caption's image
    caption_images_per_s_greedy    captioning JPEG files end to end, greedy (worker start-up included)
    caption_images_per_s_beam3     the same with beam size 3
    beam_per_image_images_per_s    beam 3 on cached features, one image at a time
    beam_batched_images_per_s      beam 3 on the same features, all of them in one batch
    train_scst_images_per_s        self-critical training steps (the same step, SelfCriticalLoss) on cached
                                   features: scst_images images x scst_samples sampled captions, CIDEr-D
                                   rewards, mean baseline (scst_reward_fraction: the share spent on rewards)
The decoder is untrained, so captions run to decode max_len words: the slowest case for decoding.
"""
from captioner.jobs.bench.job import BenchJob, format_table, main
from captioner.jobs.bench.sizes import KEYS, PRESETS, BenchSizes

__all__ = ["BenchJob", "BenchSizes", "KEYS", "PRESETS", "format_table", "main"]
