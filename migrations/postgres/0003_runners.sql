-- Flotilla: the cluster's runner registry and shard ownership.
-- Ownership itself is a session advisory lock (two keys: the cluster's
-- `lock_namespace`, then a row's `lock_key`) held on a runner's dedicated
-- lock connection; these tables name the keys and keep the epochs.

-- Lock keys of runners and shards alike: a key is never given twice within
-- one cluster, so a runner lock and a shard lock never collide.
CREATE SEQUENCE {prefix}lock_keys AS integer START WITH 1 NO CYCLE;

-- One row: the first advisory-lock key of this cluster, drawn at random, so
-- clusters in other schemas or under other prefixes of the same database
-- (whose `lock_keys` also start at 1) do not share lock keys.
CREATE TABLE {prefix}cluster (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    lock_namespace integer NOT NULL
);
INSERT INTO {prefix}cluster (lock_namespace)
    VALUES (floor(random() * 4294967296.0 - 2147483648.0)::integer);

-- Registered runners. A runner is live while its `lock_key` is locked; a row
-- whose lock is free is a dead runner (kept, so the id keeps its key).
CREATE TABLE {prefix}runners (
    runner_id     text    PRIMARY KEY,
    -- The transport address others reach it at (`ip:port`).
    address       text    NOT NULL,
    weight        integer NOT NULL,
    -- Shard groups it serves; empty: every group.
    groups        text[]  NOT NULL,
    lock_key      integer NOT NULL UNIQUE DEFAULT nextval('{prefix}lock_keys'),
    -- Unix milliseconds of its last registration.
    registered_at bigint  NOT NULL
);

-- Shards ever acquired. `epoch` is bumped by every acquisition; every
-- completion written for the shard must carry the current one.
CREATE TABLE {prefix}shards (
    shard_group text,
    shard_index bigint,
    epoch       bigint  NOT NULL,
    -- The runner that acquired it last; NULL once released.
    owner       text,
    lock_key    integer NOT NULL UNIQUE DEFAULT nextval('{prefix}lock_keys'),
    -- Unix milliseconds of the last acquisition.
    acquired_at bigint,
    PRIMARY KEY (shard_group, shard_index)
);
