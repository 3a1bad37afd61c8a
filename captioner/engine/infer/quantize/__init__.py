"""int8 graphs whose recipe is measured: calibration method (calibrate.py), the nodes kept in float
(sensitivity.py), the feature error they are judged by (measure.py), the encoder's whole recipe (encoder.py) and
quantization.json (record.py). onnx_export.quantize_graphs drives them."""
