-- Offline scenario: classify the test split (or its first N ids: $where = " WHERE id < N", pushed
-- down to PostgreSQL) with one engine's function ($function: TorchCNN, TensorflowCNN, VeloxCNN, OnnxruntimeCNN).
SELECT id, $function(img) FROM pg.cifar_test$where;
