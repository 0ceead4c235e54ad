-- Single-stream scenario: one image per query (EvaDB still reads the whole view: no pushdown).
SELECT id, TorchCNN(img) FROM pg.cifar_test WHERE id = 7;
