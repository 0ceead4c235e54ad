-- Offline scenario: classify the whole view with TensorflowCNN.
SELECT id, TensorflowCNN(img) FROM pg.cifar_test;
