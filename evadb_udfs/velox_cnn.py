"""EvaDB function VeloxCNN: the CIFAR-10 CNN on the Velox (pyvelox LocalRunner plans) engine (see cnnsql/evadb_function.py)."""
from cnnsql.evadb_function import CNNFunction


class VeloxCNN(CNNFunction):
    engine_name = "velox"
