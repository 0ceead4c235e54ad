-- cnnsql results schema: every benchmark and training run, logged by `cnnsql bench` / `cnnsql train`.
-- A run is inserted with status 'running' and marked 'complete' (or 'failed') at the end, in the same
-- transaction as its measurements: a killed benchmark never leaves a run that looks complete.

CREATE TABLE IF NOT EXISTS bench_run (
    run_id       bigserial PRIMARY KEY,
    session_id   text NOT NULL,                 -- one `cnnsql bench` invocation
    status       text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'complete', 'failed')),
    kind         text NOT NULL CHECK (kind IN ('sql', 'raw', 'train', 'ray')),
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

-- One row per timed repetition of a run.
CREATE TABLE IF NOT EXISTS bench_repetition (
    run_id  bigint NOT NULL REFERENCES bench_run ON DELETE CASCADE,
    rep     integer NOT NULL,
    wall_s  double precision NOT NULL,
    PRIMARY KEY (run_id, rep)
);

-- Training: one row per epoch.
CREATE TABLE IF NOT EXISTS train_epoch (
    run_id     bigint NOT NULL REFERENCES bench_run ON DELETE CASCADE,
    epoch      integer NOT NULL,
    seconds    double precision NOT NULL,
    loss       double precision,
    accuracy   double precision,
    PRIMARY KEY (run_id, epoch)
);
