-- The server scope of an API key: may it call the server API (/api/server/:
-- disconnect, subscribe and list the connections of anyone, on every
-- gateway)? Off for every existing key: a scope is granted, never assumed.
alter table api_keys add column server boolean not null default false;
