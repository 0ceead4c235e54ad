-- Single-stream scenario: one image per query (the WHERE is pushed down to PostgreSQL).
SELECT id, TensorflowCNN(img) FROM pg.cifar_test WHERE id = 7;
