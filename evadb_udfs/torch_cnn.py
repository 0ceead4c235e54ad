"""EvaDB function TorchCNN: the CIFAR-10 CNN on the PyTorch engine (see cnnsql/placements/evadb_function.py)."""
from cnnsql.placements.evadb_function import CNNFunction


class TorchCNN(CNNFunction):
    engine_name = "torch"
