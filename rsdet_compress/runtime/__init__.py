"""Loading what the toolkit saved, to run it: checkpoints (float or compressed), ONNX files and packed files.

Above the compression code (a compressed checkpoint or packed file is rebuilt
from its policy) and below the engines that train, evaluate and predict with
any of them.
"""
