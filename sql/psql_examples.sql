-- Queries for psql users (README "psql"). Run: psql "$(cnnsql db url)" -f sql/psql_examples.sql

-- The data: images per split and label, and where each split came from.
SELECT split, label, name AS class_name, count(*) AS images
FROM cifar_image JOIN cifar_class USING (label)
GROUP BY split, label, name ORDER BY split, label;

SELECT split, kind, source, n_rows, loaded_at FROM cifar_dataset ORDER BY split;

-- One image as the EvaDB functions see it (base64 text of the 3,072 stored bytes).
SELECT id, label, length(img) AS base64_chars FROM cifar_test WHERE id = 0;

-- Engines compared, over all complete benchmark sessions.
SELECT * FROM bench_engine_summary;

-- SQL overhead per session and engine (EvaDB query time / raw engine time).
SELECT session_id, engine, n_rows, round(sql_over_raw::numeric, 3) AS sql_over_raw,
       round(sql_images_per_s::numeric, 1) AS sql_images_per_s, round(accuracy::numeric, 4) AS accuracy
FROM bench_sql_overhead ORDER BY finished_at DESC LIMIT 12;

-- Throughput against batch size, latency percentiles, training.
SELECT * FROM bench_batch_sweep;
SELECT engine, kind, round(p50_ms::numeric, 2) AS p50_ms, round(p90_ms::numeric, 2) AS p90_ms,
       round(p99_ms::numeric, 2) AS p99_ms
FROM bench_run WHERE scenario = 'single-stream' AND status = 'complete' ORDER BY run_id DESC LIMIT 6;
SELECT * FROM train_summary;

-- Runs that did not complete (interrupted or failed) never count in the views above.
SELECT status, count(*) FROM bench_run GROUP BY status;

-- ---------------------------------------------------------------------------------------
-- Classification inside PostgreSQL: the cnnsql.<Engine>CNN functions (`cnnsql db functions install`).
-- Same names and outputs as the EvaDB functions: label, class_name, probability, probs.
SELECT to_regproc('cnnsql.torchcnn') IS NOT NULL AS has_torch,
       to_regproc('cnnsql.tensorflowcnn') IS NOT NULL AS has_tensorflow \gset
\if :has_torch
-- One image (the stored bytea; the first call of a connection loads the engine, ~1.5 s).
SELECT i.id, i.label AS true_label, p.label, p.class_name, round(p.probability::numeric, 4) AS probability
FROM cifar_image_test i, cnnsql.TorchCNN(i.img) p WHERE i.id = 8;

-- Bulk work: the batched form, one call per 256 images (the engine's batch size).
-- Accuracy per class on the first 1,000 test images.
WITH pred AS (
    SELECT p.id, p.label FROM (SELECT id / 256 AS batch, array_agg(id) AS ids, array_agg(img) AS imgs
                               FROM cifar_image_test WHERE id < 1000 GROUP BY 1) b,
                              cnnsql.TorchCNN_batch(b.ids, b.imgs) p)
SELECT c.label, c.name AS class_name, count(*) AS images, round(avg((p.label = i.label)::int), 3) AS accuracy
FROM pred p JOIN cifar_image_test i USING (id) JOIN cifar_class c ON c.label = i.label
GROUP BY c.label, c.name ORDER BY c.label;

-- Confusion counts: the ten most frequent (true class, predicted class) mistakes.
WITH pred AS (
    SELECT p.id, p.label FROM (SELECT id / 256 AS batch, array_agg(id) AS ids, array_agg(img) AS imgs
                               FROM cifar_image_test WHERE id < 1000 GROUP BY 1) b,
                              cnnsql.TorchCNN_batch(b.ids, b.imgs) p)
SELECT t.name AS true_class, pc.name AS predicted_class, count(*) AS confusions
FROM pred p JOIN cifar_image_test i USING (id)
JOIN cifar_class t ON t.label = i.label JOIN cifar_class pc ON pc.label = p.label
WHERE p.label <> i.label
GROUP BY t.name, pc.name ORDER BY confusions DESC, true_class, predicted_class LIMIT 10;

\if :has_tensorflow
-- Agreement between engines on the same 1,000 images. One engine per connection (a second
-- framework in one server process can crash it), so each engine runs after a \connect and
-- stores its predictions; the comparison reads both.
DROP TABLE IF EXISTS example_prediction;
CREATE UNLOGGED TABLE example_prediction (engine text, id integer, label integer, probs real[],
                                          PRIMARY KEY (engine, id));
\connect
INSERT INTO example_prediction
SELECT 'torch', p.id, p.label, p.probs FROM (SELECT id / 256 AS batch, array_agg(id) AS ids, array_agg(img) AS imgs
    FROM cifar_image_test WHERE id < 1000 GROUP BY 1) b, cnnsql.TorchCNN_batch(b.ids, b.imgs) p;
\connect
INSERT INTO example_prediction
SELECT 'tensorflow', p.id, p.label, p.probs FROM (SELECT id / 256 AS batch, array_agg(id) AS ids, array_agg(img) AS imgs
    FROM cifar_image_test WHERE id < 1000 GROUP BY 1) b, cnnsql.TensorflowCNN_batch(b.ids, b.imgs) p;
SELECT t.engine || ' vs ' || f.engine AS engines, count(*) AS images,
       round(avg((t.label = f.label)::int), 4) AS top1_agreement,
       max((SELECT max(abs(a - b)) FROM unnest(t.probs, f.probs) AS u(a, b))) AS max_probability_difference
FROM example_prediction t JOIN example_prediction f ON f.id = t.id AND f.engine = 'tensorflow'
WHERE t.engine = 'torch' GROUP BY 1;
DROP TABLE example_prediction;
\endif
\else
\echo 'cnnsql.TorchCNN is not installed here: run `cnnsql db functions install` to classify from psql'
\endif
