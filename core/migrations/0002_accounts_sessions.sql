-- Credentials live apart from users: user_json() is row_to_json(users), so a
-- column added to users would be sent to every client.
create table accounts (
    user_id       bigint primary key references users (id) on delete cascade,
    password_hash text not null,
    role          text not null default 'user' check (role in ('user', 'admin')),
    updated_at    timestamptz not null default now()
);

-- One row per login. The refresh tokens of a session form its family: each
-- refresh uses up one token and issues the next; presenting a used one again
-- (a stolen copy, or the thief's) revokes the whole session.
create table auth_sessions (
    id             uuid primary key default gen_random_uuid(),
    user_id        bigint not null references users (id) on delete cascade,
    created_at     timestamptz not null default now(),
    last_used_at   timestamptz not null default now(),
    expires_at     timestamptz not null,
    user_agent     text not null default '',
    ip             text not null default '',
    revoked_at     timestamptz,
    revoked_reason text
);
create index auth_sessions_user on auth_sessions (user_id) where revoked_at is null;
create index auth_sessions_revoked on auth_sessions (revoked_at) where revoked_at is not null;

create table refresh_tokens (
    token_hash bytea primary key,          -- sha256 of the token; the token is never stored
    session_id uuid not null references auth_sessions (id) on delete cascade,
    issued_at  timestamptz not null default now(),
    used_at    timestamptz                 -- set when exchanged; a second use is reuse
);
create index refresh_tokens_session on refresh_tokens (session_id);
