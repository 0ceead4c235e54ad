-- Image-folder datasets (`cnnsql load --images DIR --dataset NAME`). Created by any cnnsql command
-- that creates the schema (idempotent). CIFAR-10 stays in cifar_image (the dataset `cifar10`).
--
-- One row per dataset: its image shape, class names (label order), where it came from, how it was
-- resized (NULL: not resized, all images had this size) and the sha256 over its files' checksums.
CREATE TABLE IF NOT EXISTS image_dataset (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]{0,39}$'),
    channels    smallint NOT NULL CHECK (channels IN (1, 3)),
    height      integer NOT NULL CHECK (height > 0),
    width       integer NOT NULL CHECK (width > 0),
    class_names jsonb NOT NULL,
    source      text NOT NULL,
    resize      text,
    n_train     integer NOT NULL,
    n_test      integer NOT NULL,
    sha256      text NOT NULL,
    loaded_at   timestamptz NOT NULL DEFAULT now()
);

-- Each image once: channel-major bytes (channels x height x width), its file (relative to the folder)
-- and the sha256 of that file's bytes. Per-dataset views <name>_train / <name>_test expose them as
-- base64 (as cifar_train/cifar_test), with binary twins cnnsql_bytes.<name>_{train,test}_bytes.
CREATE TABLE IF NOT EXISTS image_dataset_image (
    dataset text NOT NULL REFERENCES image_dataset (name) ON DELETE CASCADE,
    split   text NOT NULL CHECK (split IN ('train', 'test')),
    id      integer NOT NULL CHECK (id >= 0),        -- index within its split, in file order
    label   smallint NOT NULL CHECK (label >= 0),
    file    text NOT NULL,
    sha256  text NOT NULL,
    img     bytea NOT NULL,
    PRIMARY KEY (dataset, split, id)
);
ALTER TABLE image_dataset_image ALTER COLUMN img SET STORAGE MAIN;
