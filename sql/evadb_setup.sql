-- EvaDB registration: the PostgreSQL data source `pg` and the CNN functions.
-- `cnnsql shell`, `cnnsql bench` and the examples run these statements (cnnsql/placements/evadb_session.py)
-- with the $-placeholders filled in. No password is ever written here: libpq reads it at connect
-- time (the empty "password" keeps stock EvaDB's URL valid). Function options travel as
-- CREATE FUNCTION metadata into the function's setup().
DROP DATABASE IF EXISTS pg;
CREATE DATABASE pg WITH ENGINE = 'postgres', PARAMETERS = {"user": "$user", "password": "", "host": "$host", "port": "$port", "database": "$database"};
CREATE OR REPLACE FUNCTION TorchCNN IMPL '$udf_dir/torch_cnn.py' weights '$weights' threads $threads;
CREATE OR REPLACE FUNCTION TensorflowCNN IMPL '$udf_dir/tensorflow_cnn.py' weights '$weights' threads $threads;
CREATE OR REPLACE FUNCTION VeloxCNN IMPL '$udf_dir/velox_cnn.py' weights '$weights' threads $threads;
CREATE OR REPLACE FUNCTION OnnxruntimeCNN IMPL '$udf_dir/onnxruntime_cnn.py' weights '$weights' threads $threads;
CREATE OR REPLACE FUNCTION Classify IMPL '$udf_dir/classify.py' weights '$weights' threads $threads engine '$engine';
