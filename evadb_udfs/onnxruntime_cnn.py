"""EvaDB function OnnxruntimeCNN: the weights' CNN on ONNX Runtime (the graph cnnsql exports; see cnnsql/placements/evadb_function.py)."""
from cnnsql.placements.evadb_function import CNNFunction


class OnnxruntimeCNN(CNNFunction):
    engine_name = "onnxruntime"
