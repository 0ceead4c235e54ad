-- Single-stream scenario: one image per query (the WHERE is pushed down to PostgreSQL).
SELECT id, $function(img) FROM pg.cifar_test WHERE id = $id;
