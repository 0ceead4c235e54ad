"""EvaDB function TensorflowCNN: the CIFAR-10 CNN on the TensorFlow/Keras engine (see cnnsql/placements/evadb_function.py)."""
from cnnsql.placements.evadb_function import CNNFunction


class TensorflowCNN(CNNFunction):
    engine_name = "tensorflow"
