-- Offline scenario: classify the whole view with TorchCNN.
SELECT id, TorchCNN(img) FROM pg.cifar_test;
