-- Figures of `cnnsql study growth`: cost as the data grows (one row per size, phase and engine).
CREATE TABLE IF NOT EXISTS growth_point (
    point_id      bigserial PRIMARY KEY,
    session_id    text NOT NULL,
    n_images      integer NOT NULL,          -- `cnnsql load --synthetic N`: N train + N/5 test images
    phase         text NOT NULL,             -- load, raw, sql, or a write-back: client, postgres, evadb
    engine        text,                      -- raw/sql passes
    rows_read     integer NOT NULL,          -- images loaded (both splits) or read by the pass
    wall_s        double precision NOT NULL, -- load: the whole command; raw/sql: the timed pass (median)
    images_per_s  double precision NOT NULL,
    client_peak_rss_mb       double precision, -- ru_maxrss of the phase's own process
    server_peak_rss_mb       double precision, -- largest VmRSS of one PostgreSQL process (shared buffers included)
    server_peak_anon_mb      double precision, -- largest RssAnon of one PostgreSQL process
    server_peak_anon_sum_mb  double precision, -- largest sum of RssAnon over the server's processes
    loadavg_before double precision,         -- 1-minute load average around the phase
    loadavg_after  double precision,
    detail        jsonb,                     -- walls of every repetition, query, limit, table size
    measured_at   timestamptz NOT NULL DEFAULT now()
);
-- Older tables held only load/raw/sql: the write-back phases are allowed too.
ALTER TABLE growth_point DROP CONSTRAINT IF EXISTS growth_point_phase_check;
ALTER TABLE growth_point ADD CONSTRAINT growth_point_phase_check
    CHECK (phase IN ('load', 'raw', 'sql', 'client', 'postgres', 'evadb'));
