-- The transactional outbox (core/outbox.py): a write's change event is stored
-- by the write's own statement, so it commits with the write or not at all. The
-- writing process publishes it at once and deletes the row; a row left behind
-- (the broker was down, the process died) is published by any process's relay
-- (core/relay.py). Rows live for milliseconds: a queue, not a log.
create table outbox (
    id         bigserial primary key,
    channels   text[] not null,
    payload    bytea not null,
    created_at timestamptz not null default now()
) with (
    -- Every row is deleted soon after its insert: vacuum by dead rows, not by
    -- a fraction of a table that is nearly always empty.
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000
);

-- A change event as core/events.py builds it (the same bytes), for the rows
-- written by SQL: {"type":kind,"id":id,"version":version,"data":data or null}.
create function change_event(kind text, id bigint, version integer, data text) returns bytea
language sql immutable parallel safe as $$
    select convert_to('{"type":"' || kind || '","id":' || id || ',"version":' || version
                      || ',"data":' || coalesce(data, 'null') || '}', 'UTF8')
$$;

-- The id a row's publications carry to the history scripts, which publish a
-- call they have seen once only: the same for the writer and a relay. The
-- time makes it unique across a sequence that starts again (a restored backup).
create function outbox_call(id bigint, created_at timestamptz) returns text
language sql immutable parallel safe as $$
    select 'o' || id || '.' || (extract(epoch from created_at) * 1000000)::bigint
$$;
