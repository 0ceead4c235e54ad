"""EvaDB function Classify: the CNN on the default engine (CREATE FUNCTION metadata `engine`; see cnnsql/placements/evadb_function.py)."""
from cnnsql.placements.evadb_function import CNNFunction


class Classify(CNNFunction):
    engine_name = ""  # chosen at registration: CNNSQL_ENGINE, default torch
