"""EvaDB function VeloxCNN: the CIFAR-10 CNN on the Velox (pyvelox LocalRunner plans) engine (see cnnsql/placements/evadb_function.py)."""
from cnnsql.placements.evadb_function import CNNFunction


class VeloxCNN(CNNFunction):
    engine_name = "velox"
