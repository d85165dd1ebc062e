"""Deployment artifacts: ONNX (float, int8 QDQ) and the bit-packed deploy file, each verified by mAP."""
