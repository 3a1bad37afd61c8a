"""Caption scores: coco-caption-equal BLEU/METEOR/ROUGE-L/CIDEr-D, a fast CIDEr-D on token ids, diversity."""
