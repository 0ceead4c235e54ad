-- EvaDB registration: the PostgreSQL data source `pg` and the three CNN functions.
-- `cnnsql shell`, `cnnsql bench` and `cnnsql evadb-setup` run these statements with the
-- $-placeholders filled in from the configured database (no password is ever written here:
-- the private cluster's password is read by libpq from its pgpass file).
DROP DATABASE IF EXISTS pg;
CREATE DATABASE pg WITH ENGINE = 'postgres', PARAMETERS = {"user": "$user", "password": "$password", "host": "$host", "port": "$port", "database": "$database"};
CREATE OR REPLACE FUNCTION TorchCNN IMPL '$udf_dir/torch_cnn.py';
CREATE OR REPLACE FUNCTION TensorflowCNN IMPL '$udf_dir/tensorflow_cnn.py';
CREATE OR REPLACE FUNCTION VeloxCNN IMPL '$udf_dir/velox_cnn.py';
