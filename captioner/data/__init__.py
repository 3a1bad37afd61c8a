"""Data: dataset readers (one module per format, dispatched by datasets.py), image decoding, the one
image->batch pipeline, the feature cache, synthetic data and input discovery for `caption`.

Nothing is imported here, so importing one module (e.g. data.pipeline) does not pull in the others (pycocotools)."""
