-- cnnsql data schema: CIFAR-10 in PostgreSQL. Created by `cnnsql load` (idempotent).
--
-- Each image is stored once, as 3,072 raw bytes, channel-major as in the archive
-- (1024 red, 1024 green, 1024 blue, row by row). The table is partitioned by split so a
-- load replaces one split atomically (TRUNCATE + COPY in one transaction).
-- toast_tuple_target keeps the ~3 KB rows inline and uncompressed (fast reads and loads).

CREATE TABLE IF NOT EXISTS cifar_image (
    split text     NOT NULL CHECK (split IN ('train', 'test')),
    id    integer  NOT NULL CHECK (id >= 0),          -- index within its split, as in the archive
    label smallint NOT NULL CHECK (label BETWEEN 0 AND 9),
    img   bytea    NOT NULL CHECK (octet_length(img) = 3072),
    PRIMARY KEY (split, id)
) PARTITION BY LIST (split);

CREATE TABLE IF NOT EXISTS cifar_image_train PARTITION OF cifar_image FOR VALUES IN ('train')
    WITH (toast_tuple_target = 8160);
CREATE TABLE IF NOT EXISTS cifar_image_test PARTITION OF cifar_image FOR VALUES IN ('test')
    WITH (toast_tuple_target = 8160);
ALTER TABLE cifar_image_train ALTER COLUMN img SET STORAGE MAIN;
ALTER TABLE cifar_image_test ALTER COLUMN img SET STORAGE MAIN;

CREATE TABLE IF NOT EXISTS cifar_class (
    label smallint PRIMARY KEY CHECK (label BETWEEN 0 AND 9),
    name  text NOT NULL
);

-- Provenance of each loaded split: where it came from and whether it is synthetic.
CREATE TABLE IF NOT EXISTS cifar_dataset (
    split     text PRIMARY KEY CHECK (split IN ('train', 'test')),
    kind      text NOT NULL CHECK (kind IN ('cifar-10', 'synthetic')),
    source    text NOT NULL,
    n_rows    integer NOT NULL,
    md5       jsonb NOT NULL,          -- md5 of each archive member loaded
    loaded_at timestamptz NOT NULL DEFAULT now()
);

-- EvaDB's PostgreSQL source rejects bytea, so these views expose the image as base64 text
-- (no second copy of the data): 4,096 characters, newlines removed (replace() costs the server
-- 0.11 s per 10,000 images, translate() 0.42 s). Functions decode it back.
CREATE OR REPLACE VIEW cifar_train AS
    SELECT id, label, replace(encode(img, 'base64'), E'\n', '') AS img FROM cifar_image_train;
CREATE OR REPLACE VIEW cifar_test AS
    SELECT id, label, replace(encode(img, 'base64'), E'\n', '') AS img FROM cifar_image_test;


-- Your own images (examples/classify_png.py): same layout as cifar_image, exposed the same way.
CREATE TABLE IF NOT EXISTS user_image (
    id    serial PRIMARY KEY,
    name  text NOT NULL,
    img   bytea NOT NULL CHECK (octet_length(img) = 3072)
);
CREATE OR REPLACE VIEW user_images AS
    SELECT id, name, replace(encode(img, 'base64'), E'\n', '') AS img FROM user_image;

-- Binary twins of the base64 views: cnnsql_bytes.<view>_bytes, the same rows with `img` as bytea
-- (not the same name: stock EvaDB looks columns up by table name in every schema). cnnsql's EvaDB
-- reads a twin instead of the view when a statement uses `img` only as the argument of a cnnsql
-- CNN function (cnnsql/placements/evadb_patch): 3,072 bytes per image on the wire instead of 4,096
-- characters, and no base64 work on either side. Anything else (SELECT img ...) reads the view.
CREATE SCHEMA IF NOT EXISTS cnnsql_bytes;
CREATE OR REPLACE VIEW cnnsql_bytes.cifar_train_bytes AS SELECT id, label, img FROM cifar_image_train WHERE split = 'train';
CREATE OR REPLACE VIEW cnnsql_bytes.cifar_test_bytes AS SELECT id, label, img FROM cifar_image_test WHERE split = 'test';
CREATE OR REPLACE VIEW cnnsql_bytes.user_images_bytes AS SELECT id, name, img FROM user_image;
