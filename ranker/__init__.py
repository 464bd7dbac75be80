"""Stage 3, the ranker: the ICT model and its backbones, training, ONNX export, serving `/v1/rank`, continuous updates
and evaluation."""
