-- Users own projects (by e-mail); the auth issue adds credentials.
create table users (
    id           bigint generated always as identity primary key,
    email        text not null,
    display_name text not null,
    created_at   timestamptz not null default now(),
    updated_at   timestamptz not null default now()
);
create unique index users_email_key on users (lower(email));

create table projects (
    id          bigint generated always as identity primary key,
    name        text not null,
    description text not null default '',
    owner_email text not null,
    budget      numeric(12, 2) not null check (budget >= 0 and budget <= 1000000000),
    status      text not null default 'draft' check (status in ('draft', 'active', 'done')),
    tags        text[] not null default '{}',
    starts_on   date not null,
    ends_on     date check (ends_on >= starts_on),
    milestones  jsonb not null default '[]',
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now(),
    version     integer not null default 1
);
create index projects_status_id on projects (status, id);
create index projects_tags on projects using gin (tags);
create index projects_owner_email on projects (lower(owner_email));

-- The JSON shape of a row on the wire, built by PostgreSQL so that reads hand
-- the server finished bytes. The tables' columns are exactly the API's fields,
-- in order; a column that is not for clients must be left out here.
create function project_json(p projects) returns json
language sql immutable parallel safe as $$ select row_to_json(p) $$;

create function user_json(u users) returns json
language sql immutable parallel safe as $$ select row_to_json(u) $$;

-- Idempotency-Key records: the first response to a POST, replayed on retry.
create table idempotency_keys (
    owner        text not null,
    key          text not null,
    method       text not null,
    path         text not null,
    request_hash bytea not null,
    status       integer,            -- null while the first request runs
    headers      jsonb,
    body         bytea,
    created_at   timestamptz not null default now(),
    expires_at   timestamptz not null,
    primary key (owner, key)
);
create index idempotency_keys_expires on idempotency_keys (expires_at);
