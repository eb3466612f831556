-- Keys for backend services: only a SHA-256 of each is stored (they are
-- 256-bit random strings, so a slow hash adds nothing).
create table api_keys (
    id           uuid primary key default gen_random_uuid(),
    name         text not null,
    key_hash     bytea not null unique,
    hint         text not null,                  -- the key's first characters, to tell keys apart
    channels     text[] not null default '{}',   -- patterns it may publish on
    rest         boolean not null default false, -- may it call the REST API?
    created_by   bigint references users (id) on delete set null,
    created_at   timestamptz not null default now(),
    revoked_at   timestamptz
);
