-- Fetch only, no function: what the SQL path costs before any inference.
SELECT id, img FROM pg.cifar_test;
