-- A deleted user's sessions stay, revoked, until they expire: every process
-- catches up on revocations from this table (core.app.Core.sync_revocations),
-- and a cascade would have erased the very rows that say "revoked".
alter table auth_sessions alter column user_id drop not null;
alter table auth_sessions drop constraint auth_sessions_user_id_fkey;
alter table auth_sessions
    add constraint auth_sessions_user_id_fkey
    foreign key (user_id) references users (id) on delete set null;
