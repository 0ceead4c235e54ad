"""EvaDB function TensorflowCNN: the CIFAR-10 CNN on the TensorFlow/Keras engine (see cnnsql/evadb_function.py)."""
from cnnsql.evadb_function import CNNFunction


class TensorflowCNN(CNNFunction):
    engine_name = "tensorflow"
