-- Offline scenario: classify the whole view with VeloxCNN.
SELECT id, VeloxCNN(img) FROM pg.cifar_test;
