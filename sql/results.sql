-- cnnsql results schema: every benchmark and training run, logged by `cnnsql bench` / `cnnsql train`.
-- A run is inserted with status 'running' and marked 'complete' (or 'failed') at the end, in the same
-- transaction as its measurements: a killed benchmark never leaves a run that looks complete.

CREATE TABLE IF NOT EXISTS bench_run (
    run_id       bigserial PRIMARY KEY,
    session_id   text NOT NULL,                 -- one `cnnsql bench` invocation
    status       text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'complete', 'failed')),
    kind         text NOT NULL CHECK (kind IN ('sql', 'raw', 'train', 'ray', 'indb')),  -- where inference ran:
                                                -- raw: benchmark process; sql: through EvaDB; indb: inside PostgreSQL
    scenario     text NOT NULL,                 -- offline | single-stream | train
    engine       text NOT NULL,
    query        text,                          -- the SQL text (kind sql/ray)
    split        text,
    n_rows       integer,
    batch_size   integer,
    threads      integer,
    device       text,
    warmup       integer,
    repetitions  integer,
    workers      integer,                       -- Ray workers (kind ray)
    cluster      text,                          -- 'local' or Ray cluster description
    dataset_kind text,                          -- cifar-10 | synthetic
    weights      text,
    host         text,
    versions     jsonb,
    git_commit   text,
    -- results (medians over repetitions where there are several)
    wall_s       double precision,
    images_per_s double precision,
    latency_ms   double precision,              -- per image
    p50_ms       double precision,
    p90_ms       double precision,
    p99_ms       double precision,
    accuracy     double precision,
    agreement    jsonb,                         -- {"other engine": fraction of equal top-1}
    peak_rss_mb  double precision,
    cpu_pct      double precision,              -- mean process CPU% (100 = one core)
    gpu_pct      double precision,              -- mean GPU utilisation, NULL without a GPU
    detail       jsonb,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX IF NOT EXISTS bench_run_session ON bench_run (session_id);
-- Databases made before the 'indb' placement existed: widen the kind check once.
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'bench_run'::regclass AND contype = 'c'
                 AND pg_get_constraintdef(oid) LIKE '%kind%indb%') THEN
    ALTER TABLE bench_run DROP CONSTRAINT IF EXISTS bench_run_kind_check;
    ALTER TABLE bench_run ADD CONSTRAINT bench_run_kind_check
      CHECK (kind IN ('sql', 'raw', 'train', 'ray', 'indb'));
  END IF;
END $$;

-- Spread and noise (cnnsql/measure/stats.py): the median wall_s above comes with its min and max; cpu_s is the
-- median user + system CPU of the benchmark's process tree per repetition; noisy: other processes used
-- more than 10% of the machine's CPU during the timed repetitions, or they spread more than 15%
-- (detail->'noise_reasons' says which); load_1m: the machine's load average when the session started.
ALTER TABLE bench_run ADD COLUMN IF NOT EXISTS cpu_s double precision;
ALTER TABLE bench_run ADD COLUMN IF NOT EXISTS wall_min_s double precision;
ALTER TABLE bench_run ADD COLUMN IF NOT EXISTS wall_max_s double precision;
ALTER TABLE bench_run ADD COLUMN IF NOT EXISTS noisy boolean;
ALTER TABLE bench_run ADD COLUMN IF NOT EXISTS load_1m real;

-- One row per timed repetition of a run (in the order they ran: interleaved with the runs they are
-- compared with).
CREATE TABLE IF NOT EXISTS bench_repetition (
    run_id  bigint NOT NULL REFERENCES bench_run ON DELETE CASCADE,
    rep     integer NOT NULL,
    wall_s  double precision NOT NULL,
    PRIMARY KEY (run_id, rep)
);
ALTER TABLE bench_repetition ADD COLUMN IF NOT EXISTS cpu_s double precision;

-- Training: one row per epoch.
CREATE TABLE IF NOT EXISTS train_epoch (
    run_id     bigint NOT NULL REFERENCES bench_run ON DELETE CASCADE,
    epoch      integer NOT NULL,
    seconds    double precision NOT NULL,
    loss       double precision,
    accuracy   double precision,
    PRIMARY KEY (run_id, epoch)
);

-- ---------------------------------------------------------------------------------------
-- Views for psql users: compare engines without Python. Only complete runs count.

-- Each SQL offline run beside the raw run of the same engine in the same session.
CREATE OR REPLACE VIEW bench_sql_overhead AS
SELECT s.session_id, s.engine, s.n_rows, s.threads, s.device,
       r.wall_s AS raw_wall_s, s.wall_s AS sql_wall_s, s.wall_s / r.wall_s AS sql_over_raw,
       r.images_per_s AS raw_images_per_s, s.images_per_s AS sql_images_per_s,
       s.accuracy, s.agreement, s.cpu_pct, s.gpu_pct, s.peak_rss_mb, s.dataset_kind, s.finished_at,
       (s.noisy OR r.noisy) AS noisy
FROM bench_run s
JOIN bench_run r ON r.session_id = s.session_id AND r.engine = s.engine AND r.n_rows = s.n_rows
                AND r.kind = 'raw' AND r.scenario = 'offline' AND r.status = 'complete'
WHERE s.kind = 'sql' AND s.scenario = 'offline' AND s.status = 'complete';

-- Per engine, over all sessions: medians of throughput, SQL overhead, accuracy and latency.
CREATE OR REPLACE VIEW bench_engine_summary AS
SELECT o.engine,
       count(*)                                                         AS sessions,
       max(o.n_rows)                                                    AS images,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY o.raw_images_per_s)::numeric, 1) AS raw_images_per_s,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY o.sql_images_per_s)::numeric, 1) AS sql_images_per_s,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY o.sql_over_raw)::numeric, 3)     AS sql_over_raw,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY o.accuracy)::numeric, 4)         AS accuracy,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY o.cpu_pct)::numeric, 0)          AS cpu_pct,
       (SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY p50_ms)::numeric, 2)
          FROM bench_run l WHERE l.engine = o.engine AND l.kind = 'raw'
           AND l.scenario = 'single-stream' AND l.status = 'complete')  AS single_stream_p50_ms,
       max(o.finished_at)                                               AS last_run
FROM bench_sql_overhead o
GROUP BY o.engine
ORDER BY sql_images_per_s DESC;

-- Throughput against batch size (raw engine), median over sessions.
CREATE OR REPLACE VIEW bench_batch_sweep AS
SELECT engine, batch_size, count(*) AS runs,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY images_per_s)::numeric, 1) AS images_per_s
FROM bench_run
WHERE status = 'complete' AND kind = 'raw' AND scenario = 'batch-sweep'
GROUP BY engine, batch_size
ORDER BY engine, batch_size;

-- Training runs: seconds per epoch and test accuracy.
CREATE OR REPLACE VIEW train_summary AS
SELECT r.run_id, r.engine AS framework, r.n_rows, r.dataset_kind, count(e.epoch) AS epochs,
       round(avg(e.seconds)::numeric, 1) AS seconds_per_epoch, round(r.accuracy::numeric, 4) AS test_accuracy,
       r.finished_at
FROM bench_run r JOIN train_epoch e USING (run_id)
WHERE r.kind = 'train' AND r.status = 'complete'
GROUP BY r.run_id
ORDER BY r.finished_at DESC;

-- Predictions written back by Ray workers (`cnnsql bench --cluster ray`). One row per image per
-- run: workers upsert on (run_id, id), so a retried shard cannot duplicate rows. A custom
-- --table is created LIKE this one.
CREATE TABLE IF NOT EXISTS ray_prediction (
    run_id      bigint   NOT NULL REFERENCES bench_run ON DELETE CASCADE,
    id          integer  NOT NULL,
    label       smallint NOT NULL,
    probability real     NOT NULL,
    probs       real[]   NOT NULL,
    worker      text     NOT NULL,     -- host:pid of the worker that wrote it last
    attempt     integer  NOT NULL DEFAULT 1,
    PRIMARY KEY (run_id, id)
);
