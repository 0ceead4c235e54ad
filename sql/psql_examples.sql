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
